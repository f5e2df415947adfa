"""Where the synthetic data's segments land: the ICL score must measure in-context learning,
not where copies happen to sit (issue: the ICL score started near +1 when copies crowded the
late context indices)."""
import json

import numpy as np
import pytest

from icl_jax import config as config_lib, data

EARLY, LATE, L = 5, 50, 65  # the small config's ICL indices; targets sit one position later


def _batch(placement, n=4096, background="lag2", **kw):
    source = data.SyntheticSource(64, 0, background, 4, 1, 3, 6, 19, L, 0.5, placement, **kw)
    rng = np.random.default_rng(1)
    if placement == "uniform":
        return source, data.uniform_segments(rng, n, L, 64, source.table, 1, 3, 6, 19, lag=2)
    return source, data.synthetic_tokens(rng, n, L, 64, source.table, 1, 3, 6, 19, lag=2)


def _breaks_lag2_rule(source, x):
    ok = np.ones(x.shape, bool)
    for t in range(2, x.shape[1]):
        ok[:, t] = (source.table[x[:, t - 2]] == x[:, t][:, None]).any(1)
    return ~ok


@pytest.mark.parametrize("placement, equal", [("uniform", True), ("after", False)])
def test_early_and_late_targets_are_equally_likely_pasted_only_with_uniform_placement(
        placement, equal):
    source, (x, pasted) = _batch(placement)
    breaks = _breaks_lag2_rule(source, x)
    for name, mask in (("pasted", pasted), ("breaks the background rule", breaks)):
        early, late = mask[:, EARLY + 1].mean(), mask[:, LATE + 1].mean()
        # 4096 rows: a share's standard error is under 0.008
        assert (abs(early - late) < 0.04) == equal, (placement, name, early, late)


def test_uniform_placement_only_pasted_tokens_break_the_background_rule():
    source, (x, pasted) = _batch("uniform", n=512)
    breaks = _breaks_lag2_rule(source, x)
    assert not (breaks & ~pasted).any()
    assert breaks.mean() > 0.2  # fresh strings do break it


def test_uniform_placement_writes_each_string_twice():
    source, (x, pasted) = _batch("uniform", n=256)
    # every row with a pasted run holds some 4-gram of it twice (chance: ~65^2/64^4)
    hits = 0
    for row, mask in zip(x, pasted):
        grams = [tuple(row[i:i + 4]) for i in range(L - 3) if mask[i:i + 4].all()]
        hits += len(grams) != len(set(grams))
    assert hits > 0.8 * 256


def test_saved_configs_without_placement_keep_the_old_data():
    cfg = config_lib.load_validated("small:layers=2", {"data.placement": "uniform"})
    assert cfg.data.placement == "uniform"
    saved = json.loads(cfg.to_json())
    del saved["data"]["placement"]
    assert config_lib.from_json(json.dumps(saved)).data.placement == "after"


def test_saved_text_configs_without_placement_still_resume():
    # text runs never read data.placement: a run saved before the field existed must compare
    # equal to today's config of the same run, or resuming it fails on a field it never used
    cfg = config_lib.load_validated("small:layers=2", {"data.name": "pystdlib", "model.vocab_size": 256})
    saved = json.loads(cfg.to_json())
    del saved["data"]["placement"]
    assert config_lib.upgrade(saved)["data"]["placement"] == cfg.data.placement


def test_unknown_placement_is_named():
    with pytest.raises(data.DataError, match="data.placement"):
        data.SyntheticSource(64, 0, "lag2", placement="sideways")


def test_a_mixed_background_gives_each_row_one_of_the_two_rules():
    """data.background=mixed: every row's background follows token t-1 (markov) or token t-2
    (lag2), about half each; only pasted tokens break the row's rule."""
    source = data.SyntheticSource(64, 0, "mixed", 4, 1, 3, 6, 19, L, 0.5, "uniform")
    x, pasted = data.uniform_segments(np.random.default_rng(1), 1024, L, 64, source.table,
                                      1, 3, 6, 19, lag=source.lag)

    def breaks(lag):
        ok = np.ones(x.shape, bool)
        for t in range(lag, L):
            ok[:, t] = (source.table[x[:, t - lag]] == x[:, t][:, None]).any(1)
        return ~ok & ~pasted

    follows = {lag: ~breaks(lag).any(1) for lag in (1, 2)}
    assert (follows[1] | follows[2]).all()  # every row keeps one rule wherever it is drawn
    assert 0.4 < follows[1].mean() < 0.6 and 0.4 < follows[2].mean() < 0.6
    with pytest.raises(data.DataError, match="mixed"):
        data.SyntheticSource(64, 0, "mixed", placement="after")


def test_a_copy2_background_repeats_the_token_two_back_or_follows_the_previous_one():
    """data.background=copy2: each background token (from position 2) is the token two back
    with probability data.COPY2_PROB, else one of the previous token's markov successors;
    only pasted tokens break that, and every index is as likely pasted as with lag2."""
    source = data.SyntheticSource(64, 0, "copy2", 4, 1, 3, 6, 19, L, 0.5, "uniform")
    x, pasted = data.uniform_segments(np.random.default_rng(1), 4096, L, 64, source.table,
                                      1, 3, 6, 19, lag=source.lag, copy_prob=source.copy_prob)
    copies = np.zeros(x.shape, bool)
    follows = np.zeros(x.shape, bool)
    copies[:, 2:] = x[:, 2:] == x[:, :-2]
    follows[:, 1:] = (source.table[x[:, :-1]] == x[:, 1:, None]).any(-1)
    background = ~pasted
    background[:, 0] = False  # the first token is drawn at random
    assert (copies | follows)[background].all()
    assert (~(copies | follows) & pasted).mean() > 0.1  # fresh strings break it
    # copies: COPY2_PROB plus the markov draws that land on the token two back (~4/64 of the
    # rest at most); markov successors: the rest, plus copies that happen to be successors
    share = copies[:, 2:][background[:, 2:]].mean()
    assert data.COPY2_PROB <= share < data.COPY2_PROB + 0.05, share
    assert follows[background].mean() > 1 - data.COPY2_PROB
    early, late = pasted[:, EARLY + 1].mean(), pasted[:, LATE + 1].mean()
    assert abs(early - late) < 0.04, (early, late)
    with pytest.raises(data.DataError, match="copy2"):
        data.SyntheticSource(64, 0, "copy2", placement="after")
    # the data a config names
    cfg = config_lib.load_validated("small:layers=2", {"data.background": "copy2"})
    made = data.make_source(cfg)
    assert made.copy_prob == data.COPY2_PROB and made.lag == 1
