"""Synthetic batches made on the device (device_data.py): the numpy source's distribution,
drawn from (seed, step) alone, whatever the device count; training on them resumes exactly.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from icl_jax import checkpoints, config as config_lib, data, device_data, train

EARLY, LATE, L, V = 5, 50, 65, 64  # the small config's ICL indices; targets sit one later
N = 4096  # rows per sample: a share's standard error is under 0.008


@functools.lru_cache(maxsize=None)
def _samples(background, parallel_fill=False):
    """((numpy tokens, pasted), (device tokens, pasted), source) for the small config's data."""
    source = data.SyntheticSource(V, 0, background, 4, 1, 3, 6, 19, L, 0.5, "uniform")
    host = data.uniform_segments(np.random.default_rng(1), N, L, V, source.table, 1, 3, 6, 19,
                                 lag=source.lag, copy_prob=source.copy_prob)
    gen = device_data.DeviceSynthetic(source, parallel_fill=parallel_fill)
    fn = jax.jit(lambda inputs: gen.rows_and_pasted(inputs, 7, jnp.arange(N)))
    dev = tuple(np.asarray(a) for a in fn(gen.inputs()))
    return host, dev, source


def _breaks_rule(source, x):
    """Targets that the background could not have drawn from the token `lag` before (or,
    for copy2, that are not the token two before either)."""
    lag = source.lag
    ok = np.ones(x.shape, bool)
    for t in range(lag, x.shape[1]):
        ok[:, t] = (source.table[x[:, t - lag]] == x[:, t][:, None]).any(1)
        if source.copy_prob and t >= 2:
            ok[:, t] |= x[:, t] == x[:, t - 2]
    return ~ok


def _runs(pasted):
    """Lengths of the runs of pasted positions, and their number per row."""
    edges = np.diff(np.pad(pasted.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    starts, ends = np.nonzero(edges == 1), np.nonzero(edges == -1)
    return ends[1] - starts[1], np.bincount(starts[0], minlength=len(pasted))


@pytest.mark.parametrize("background", ["lag2", "markov", "copy2"])
def test_device_batches_have_the_numpy_sources_distribution(background):
    (xh, ph), (xd, pd), source = _samples(background)
    assert xd.shape == (N, L) and xd.dtype == np.int32
    # the pasted share at every context index, the ICL score's two above all (~0.43, ~0.44)
    for t in (EARLY + 1, LATE + 1):
        assert abs(ph[:, t].mean() - pd[:, t].mean()) < 0.04, (t, ph[:, t].mean(), pd[:, t].mean())
    assert np.abs(ph.mean(0) - pd.mean(0)).max() < 0.05
    # the targets that break the background's rule, in all and at the two indices
    bh, bd = _breaks_rule(source, xh), _breaks_rule(source, xd)
    assert abs(bh.mean() - bd.mean()) < 0.01, (bh.mean(), bd.mean())
    for t in (EARLY + 1, LATE + 1):
        assert abs(bh[:, t].mean() - bd[:, t].mean()) < 0.04
    # only pasted tokens break it: the background was filled around them, in order
    assert not (bd & ~pd).any() and bd.mean() > 0.2
    # segments: runs of pasted tokens per row and their lengths (total variation)
    (len_h, count_h), (len_d, count_d) = _runs(ph), _runs(pd)
    hist = lambda a, n: np.bincount(a, minlength=n)[:n] / len(a)  # noqa: E731
    assert abs(count_h.mean() - count_d.mean()) < 0.05, (count_h.mean(), count_d.mean())
    assert 0.5 * np.abs(hist(count_h, 8) - hist(count_d, 8)).sum() < 0.03
    assert 0.5 * np.abs(hist(len_h, L + 1) - hist(len_d, L + 1)).sum() < 0.04
    # token frequencies: the table's stationary mix (far from uniform), so the same table
    fh, fd = (np.bincount(x.ravel(), minlength=V) / x.size for x in (xh, xd))
    assert fh.max() > 1.5 / V
    assert np.abs(fh - fd).max() < 0.15 / V
    # copy2: the share of background tokens that repeat the token two back (copy_prob, plus
    # the markov draws that happen to), in both
    if source.copy_prob:
        share = [(x[:, 2:] == x[:, :-2])[~p[:, 2:]].mean() for x, p in ((xh, ph), (xd, pd))]
        assert abs(share[0] - share[1]) < 0.01 and 0.5 < share[0] < 0.6, share


def test_uniform_background_and_both_fills():
    (xh, ph), (xd, pd), _ = _samples("uniform")
    assert abs(ph.mean() - pd.mean()) < 0.01
    fd = np.bincount(xd.ravel(), minlength=V) / xd.size
    assert np.abs(fd - 1 / V).max() < 0.15 / V
    # the parallel fill (for accelerators) makes the scan's tokens from the same draws
    for background in ("markov", "lag2"):
        np.testing.assert_array_equal(_samples(background)[1][0],
                                      _samples(background, parallel_fill=True)[1][0])


def _gen(seed=0, background="lag2"):
    source = data.SyntheticSource(32, seed, background, 4, 1, 3, 3, 8, 33, 0.5, "uniform")
    return device_data.DeviceSynthetic(source)


def test_a_batch_is_a_pure_function_of_seed_and_step():
    gen = _gen()
    batch = jax.jit(lambda inputs, step: gen.batch(inputs, step, 16))
    a, again = batch(gen.inputs(), 3), jax.jit(lambda i, s: gen.batch(i, s, 16))(gen.inputs(), 3)
    np.testing.assert_array_equal(a, again)
    assert (np.asarray(a) != np.asarray(batch(gen.inputs(), 4))).mean() > 0.5
    other = _gen(seed=1)
    assert (np.asarray(a) != np.asarray(batch(other.inputs(), 3))).mean() > 0.5
    # the markov table is the numpy source's: the held-out set shares the background
    np.testing.assert_array_equal(gen.inputs()["table"], data.SyntheticSource(
        32, 0, "lag2", 4, 1, 3, 3, 8, 33, 0.5, "uniform").table)


def test_rows_made_on_4_devices_are_the_one_device_batch():
    assert jax.device_count() == 4
    gen, mesh = _gen(), train.make_mesh()
    generate = device_data.step_generator(gen, 16 // 4)
    sharded = jax.jit(jax.shard_map(generate, mesh=mesh, in_specs=(P(), P()),
                                    out_specs=P("data")))
    whole = jax.jit(lambda i, s: gen.batch(i, s, 16))
    for step in (0, 5):
        np.testing.assert_array_equal(sharded(gen.inputs(), jnp.int32(step)),
                                      whole(gen.inputs(), step))


def test_auto_makes_batches_on_accelerators_only():
    d = config_lib.load("small:layers=2").data
    assert device_data.use_device(d, "gpu") and device_data.use_device(d, "tpu")
    assert not device_data.use_device(d, "cpu")
    d.generate = "device"
    assert device_data.use_device(d, "cpu")
    d.generate, d.name = "auto", "pystdlib"
    assert not device_data.use_device(d, "gpu")


@pytest.mark.parametrize("overrides, message", [
    ({"data.generate": "gpu"}, "data.generate"),
    ({"data.generate": "device", "data.name": "pystdlib", "model.vocab_size": 256},
     "only synthetic"),
    ({"data.generate": "device", "data.placement": "after"}, "placement='uniform'"),
])
def test_device_generation_of_data_it_cannot_make_is_a_config_error(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_validated("small:layers=2", overrides)


def test_saved_configs_without_generate_resume():
    cfg = config_lib.load_validated("small:layers=2")
    saved = cfg.to_dict()
    del saved["data"]["generate"]
    assert config_lib.from_dict(saved).data.generate == "auto"


def _no_host_batches(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a training batch was made on the host")
    monkeypatch.setattr(data.SyntheticSource, "batch", refuse)


def test_device_generated_run_resumes_exactly(tiny, tmp_path, monkeypatch):
    _no_host_batches(monkeypatch)
    cfg = tiny(**{"data.generate": "device"})
    train.train_and_evaluate(cfg, str(tmp_path / "straight"), progress=False)
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False, stop_after=6)
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), progress=False)
    a = checkpoints.Run(str(tmp_path / "straight")).params(12)
    b = checkpoints.Run(str(tmp_path / "resumed")).params(12)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_device_generated_ensemble_member_equals_its_run_alone(tiny, tmp_path, monkeypatch):
    _no_host_batches(monkeypatch)
    configs = [tiny(**{"data.generate": "device", "seed": s, "train.steps": 4}) for s in (0, 1)]
    dirs = [str(tmp_path / f"m{s}") for s in (0, 1)]
    out = train.train_ensemble(configs, dirs, progress=False)
    alone = train.train_and_evaluate(configs[1], str(tmp_path / "alone"), progress=False)
    assert out[0]["train_loss"] != out[1]["train_loss"]  # each member its own data
    np.testing.assert_allclose(out[1]["train_loss"], alone["train_loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 checkpoints.Run(dirs[1]).params(4),
                 checkpoints.Run(str(tmp_path / "alone")).params(4))
