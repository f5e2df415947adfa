"""scores.snapshot_scores (as the analysis jits it) against the same scores computed with TransformerLens hooks (tl_check.py)."""
import jax
import numpy as np
import pytest

pytest.importorskip("transformer_lens")

from conftest import tiny_config  # noqa: E402
from icl_jax import analysis, data as data_lib, scores, tl_check  # noqa: E402
from icl_jax.model import init_params, make_model  # noqa: E402


def _snapshot(config, seed=0):
    """Random params with nonzero biases and sharper attention than at initialisation,
    so that every score, biases included, is far from trivial."""
    model = make_model(config.model)
    rng = np.random.default_rng(seed)

    def perturb(path, a):
        name = jax.tree_util.keystr(path)
        if "b_" in name:
            return (0.3 * rng.normal(size=a.shape)).astype(np.float32)
        return (np.asarray(a) * (3.0 if "W_Q" in name else 1.0)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(
        perturb, jax.device_get(init_params(model, jax.random.key(seed))))
    return model, params


def _inputs(c):
    """The evaluation inputs as the analysis builds them."""
    return scores.evaluation_inputs(c, data_lib.make_source(c))


# context 80 with 10 repeats: eval set and probe span two of causal_attention's query blocks
LONG = {"model.context": 80, "eval.probe_repeats": 10}


@pytest.mark.parametrize("arg,overrides,ablation", [
    ("layers=1", {}, "pattern"),
    ("layers=1,mlp=true", {}, "pattern"),
    ("layers=2", LONG, "pattern"),
    ("layers=2", {}, "zero"),
    ("layers=2", {}, "mean"),
])
def test_hooks_compute_our_scores(arg, overrides, ablation):
    c = tiny_config(arg, **overrides)
    model, params = _snapshot(c)
    inputs, e = _inputs(c), c.eval
    ours = jax.device_get(analysis.scorer(model, e.icl_early_index, e.icl_late_index,
                                          e.probe_tokens, ablation)(params, inputs))
    del ours["probe_attention"]  # kept for a figure, not a score
    inputs = (inputs["eval_BT1"], inputs["probe_BT"], inputs["pca_index_B"])
    tl = tl_check.hooked_transformer(params, model.cfg)
    theirs = tl_check.score_with_hooks(tl, *inputs, e.icl_early_index, e.icl_late_index,
                                   e.probe_tokens, ablation)
    flat = dict(jax.tree_util.tree_flatten_with_path(theirs)[0])
    assert len(flat) == len(jax.tree.leaves(ours)) == 13
    for path, want in jax.tree_util.tree_flatten_with_path(ours)[0]:
        got = flat[path]
        assert got.shape == want.shape, jax.tree_util.keystr(path)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    assert np.abs(ours["ablation_icl"]).max() > 0.05 and np.abs(ours["prefix_matching"]).min() > 0
    if arg == "layers=2" and ablation == "pattern":
        # the comparison can tell pattern-preserving from plain zero ablation
        zero = tl_check.score_with_hooks(tl, *inputs, e.icl_early_index, e.icl_late_index,
                                     e.probe_tokens, "zero")
        assert np.abs(zero["ablation_icl"] - ours["ablation_icl"]).max() > 100 * 1e-5


@pytest.mark.parametrize("arg,feature", [("layers=1,layer_norm=true,positions=residual",
                                          "LayerNorm"), ("layers=1,smear=true", "smeared keys")])
def test_unsupported_models_are_named(arg, feature):
    c = tiny_config(arg)
    model, params = _snapshot(c)
    with pytest.raises(NotImplementedError, match=feature):
        tl_check.hooked_transformer(params, model.cfg)
