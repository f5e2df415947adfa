"""The measurements against things known independently: a hand-wired induction
circuit, full-matrix eigenvalues, Python loops, and direct logit terms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icl_jax import scores
from icl_jax.model import init_params, make_model

V, T, K, H = 32, 40, 40, 2
TOK, POS, PREV, OUT = 0, 32, 72, 104  # orthogonal residual subspaces
D = 136


def _cfg(**kw):
    cfg = dict(n_layers=2, d_model=D, n_heads=H, d_head=K, mlp=False, d_mlp=4, layer_norm=False,
               positions="shortformer", pos_init_std=1.0, smear_keys=False, smear_init=0.0,
               context=T, vocab_size=V, dtype="float32")
    cfg.update(kw)
    return cfg


def hand_wired():
    """Layer 0 head 0: previous-token head writing "previous token = t" into PREV.
    Layer 1 head 0: induction head (query: current token, key: PREV, K-composition),
    copying the attended token into OUT, which W_U reads. Other heads are zero."""
    model = make_model(_cfg())
    p = jax.tree.map(np.zeros_like, jax.device_get(init_params(model, jax.random.key(0))))
    c = 30.0 * np.sqrt(K)  # near-hard attention after the 1/sqrt(d_head)
    p["W_E"][np.arange(V), TOK + np.arange(V)] = 1
    p["W_pos"][np.arange(T), POS + np.arange(T)] = 1
    a0, a1 = p["block_0"]["attn"], p["block_1"]["attn"]
    a0["W_Q"][0, POS + np.arange(T), np.arange(T)] = c          # query: position i
    a0["W_K"][0, POS + np.arange(T - 1), np.arange(1, T)] = 1   # key: position j -> i = j + 1
    a0["W_V"][0, TOK + np.arange(V), np.arange(V)] = 1
    a0["W_O"][0, np.arange(V), PREV + np.arange(V)] = 1
    a1["W_Q"][0, TOK + np.arange(V), np.arange(V)] = c
    a1["W_K"][0, PREV + np.arange(V), np.arange(V)] = 1
    a1["W_V"][0, TOK + np.arange(V), np.arange(V)] = 1
    a1["W_O"][0, np.arange(V), OUT + np.arange(V)] = 1
    p["W_U"][OUT + np.arange(V), np.arange(V)] = 10.0
    return model, jax.tree.map(jnp.asarray, p)


def repeated(n, length, reps, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [np.concatenate([[0], np.tile(rng.choice(np.arange(1, V), length, replace=False),
                                         reps)]) for _ in range(n)]
    return np.asarray(seqs, np.int32)


def test_hand_wired_induction_circuit():
    model, p = hand_wired()
    probe = repeated(6, 8, 4)  # [6, 33]
    text = repeated(16, 13, 3, seed=1)  # [16, 40]: positions 14.. are predictable
    got = jax.device_get(jax.jit(lambda p: {
        "pm": scores.prefix_matching(model, p, probe, 8),
        "prev": scores.previous_token(model, p, probe),
        "copying": scores.copying(model, p),
        "copying_emp": scores.copying_empirical(model, p, probe, 8),
        "comp": scores.composition(model, p),
        "icl": scores.icl_score(model, p, text, early=3, late=30),
        "abl": scores.head_ablation_icl(model, p, text, 3, 30, "pattern"),
        "abl_zero": scores.head_ablation_icl(model, p, text, 3, 30, "zero")})(p))
    pm = got["pm"]
    assert pm[1, 0] > 0.95
    others = np.delete(pm.ravel(), 2)
    assert others.max() < 0.2  # chance is about 1/position
    prev = got["prev"]
    assert prev[0, 0] > 0.95 and prev[0, 1] < 0.2
    cp = got["copying"]
    assert cp[1, 0] > 0.99 and np.abs(cp[0]).max() < 1e-6
    assert got["copying_emp"][1, 0] > 0.95
    comp = got["comp"]
    assert comp["k"][0, 0, 1, 0] > 0.1 and comp["k"].argmax() == np.ravel_multi_index(
        (0, 0, 1, 0), comp["k"].shape)
    assert comp["q"][0, 0, 1, 0] < 1e-6 and comp["v"][0, 0, 1, 0] < 1e-6

    icl = float(got["icl"])
    assert icl < -2.0
    abl = got["abl"]
    assert abl[1, 0] > 2.0 and abs(abl[0, 1]) < 0.05 and abs(abl[1, 1]) < 0.05
    icl_ablated = icl + abl[1, 0]
    assert abs(icl_ablated) < 0.1  # in-context learning gone
    # zero ablation of the previous-token head also breaks induction (through K-composition)
    assert got["abl_zero"][0, 0] > 2.0


def _random(seed, **kw):
    model = make_model(_cfg(d_model=16, n_heads=2, d_head=4, context=12, vocab_size=10, **kw))
    return model, init_params(model, jax.random.key(seed))


def test_copying_small_product_equals_full_matrix():
    model, p = _random(1)
    got = np.asarray(scores.copying(model, p))
    for l in range(2):
        for h in range(2):
            a = p[f"block_{l}"]["attn"]
            M = np.asarray(p["W_E"] @ a["W_V"][h] @ a["W_O"][h] @ p["W_U"], np.float64)
            ev = np.linalg.eigvals(M)
            want = ev.real.sum() / np.abs(ev).sum()
            assert np.isclose(got[l, h], want, atol=1e-4)


def test_vmapped_scores_equal_loop():
    model, _ = _random(0, layer_norm=True, mlp=True)
    stacked = jax.tree.map(lambda *a: jnp.stack(a),
                           *[init_params(model, jax.random.key(s)) for s in range(3)])
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 10, (4, 13)).astype(np.int32)
    probe = np.concatenate([np.zeros((3, 1), np.int32), np.tile(
        rng.integers(1, 10, (3, 3)), 3).astype(np.int32)], 1)
    idx = scores.pca_token_indices(4, 12, 0)
    fns = {
        "icl": lambda p: scores.icl_score(model, p, toks, 2, 9),
        "prefix": lambda p: scores.prefix_matching(model, p, probe, 3),
        "prev": lambda p: scores.previous_token(model, p, toks[:, :-1]),
        "copying": lambda p: scores.copying(model, p),
        "copying_emp": lambda p: scores.copying_empirical(model, p, probe, 3),
        "comp": lambda p: scores.composition(model, p),
        "abl": lambda p: scores.head_ablation_icl(model, p, toks, 2, 9, "mean"),
        "abl_seq": lambda p: scores.head_ablation_icl(model, p, toks, 2, 9, head_batch=1),
        "pca": lambda p: scores.per_token_losses(model, p, toks, idx),
    }
    all_scores = lambda p: {name: f(p) for name, f in fns.items()}
    batched = jax.jit(jax.vmap(all_scores))(stacked)
    single = jax.jit(all_scores)
    for i in range(3):
        one = single(jax.tree.map(lambda a: a[i], stacked))
        for name in fns:
            jax.tree.map(lambda b, o: np.testing.assert_allclose(
                b[i], o, rtol=1e-4, atol=1e-5, err_msg=name), batched[name], one[name])


def test_pattern_preserving_ablation_is_the_direct_term():
    model, p = _random(2)  # attention-only, no LayerNorm
    toks = np.random.default_rng(1).integers(0, 10, (3, 12)).astype(np.int32)
    logits, cache = model.apply({"params": p}, toks)
    z, att = np.asarray(cache["z"]), np.asarray(cache["attention"])
    W_O = lambda l: np.asarray(p[f"block_{l}"]["attn"]["W_O"])
    W_V = lambda l: np.asarray(p[f"block_{l}"]["attn"]["W_V"])
    W_U = np.asarray(p["W_U"])
    for l, h in [(1, 0), (1, 1), (0, 1)]:
        mask = np.ones((2, 2), np.float32)
        mask[l, h] = 0
        ablated, _ = model.apply({"params": p}, toks, head_mask=mask, patterns=cache["attention"])
        out_BTD = z[:, l, :, h] @ W_O(l)[h]
        delta = out_BTD.copy()
        if l == 0:  # through layer 1's values, patterns frozen: still linear
            for h2 in range(2):
                v = out_BTD @ W_V(1)[h2]
                delta += np.einsum("bts,bsk->btk", att[:, 1, h2], v) @ W_O(1)[h2]
        np.testing.assert_allclose(np.asarray(ablated), np.asarray(logits) - delta @ W_U,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_snapshot_scores_equal_the_stand_alone_functions():
    """snapshot_scores shares one clean run and one probe run between the scores; each must
    equal its own function, which runs the model itself."""
    model, _ = _random(0, layer_norm=True, mlp=True)
    rng = np.random.default_rng(0)
    eval_BT1 = rng.integers(0, 10, (4, 13)).astype(np.int32)
    probe = np.concatenate([np.zeros((3, 1), np.int32),
                            np.tile(rng.integers(1, 10, (3, 3)), 3).astype(np.int32)], 1)
    inputs = {"eval_BT1": eval_BT1, "probe_BT": probe,
              "pca_index_B": scores.pca_token_indices(4, 12, 0)}
    for seed in range(2):
        p = init_params(model, jax.random.key(seed))
        got = jax.jit(lambda p: scores.snapshot_scores(model, p, inputs, 2, 9, 3, "mean"))(p)
        got["copying"] = scores.copying_from_ov_products(got.pop("ov_products"))
        diffs = [float(scores.icl_score(model, p, eval_BT1[b:b + 1], 2, 9)) for b in range(4)]
        want = {
            "loss_by_position": scores.mean_loss_by_position(model, p, eval_BT1),
            "icl_score": scores.icl_score(model, p, eval_BT1, 2, 9),
            # one example at a time: the spread of their ICL scores, over sqrt(examples)
            "icl_se": np.std(diffs, ddof=1) / 2.0,
            "icl_by_example": np.asarray(diffs),
            "per_token_loss": scores.per_token_losses(model, p, eval_BT1, inputs["pca_index_B"]),
            # each example's mean loss over its context, one example at a time
            "loss_by_example": np.asarray([scores.mean_loss_by_position(
                model, p, eval_BT1[b:b + 1]).mean() for b in range(4)]),
            "prefix_matching": scores.prefix_matching(model, p, probe, 3),
            "previous_token": scores.previous_token(model, p, eval_BT1[:, :-1]),
            "copying": scores.copying(model, p),
            "copying_empirical": scores.copying_empirical(model, p, probe, 3),
            "ablation_icl": scores.head_ablation_icl(model, p, eval_BT1, 2, 9, "mean"),
            "composition": scores.composition(model, p),
            "probe_attention": model.apply({"params": p}, probe[:1])[1]["attention"][0],
        }
        assert set(got) == set(want)
        for name, w in want.items():
            jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5, err_msg=name),
                         got[name], w)


@pytest.mark.parametrize("kind", scores.ABLATIONS)
def test_ablation_rerun_from_the_heads_layer_equals_a_full_rerun(kind):
    """head_ablation_icl reruns only the blocks from the ablated head's layer on; a full
    rerun of the model with the same intervention, head by head, must give the same."""
    model, p = _random(3, n_layers=3, layer_norm=True, mlp=True)
    toks = np.random.default_rng(1).integers(0, 10, (5, 13)).astype(np.int32)
    got = np.asarray(scores.head_ablation_icl(model, p, toks, 2, 9, kind))
    _, cache = model.apply({"params": p}, toks[:, :-1])
    clean = scores.icl_score(model, p, toks, 2, 9)
    fill = cache["z"].mean(0) if kind == "mean" else np.zeros((3, 1, 1, 1), np.float32)
    for l in range(3):
        for h in range(2):
            mask = np.ones((3, 2), np.float32)
            mask[l, h] = 0
            want = scores.icl_score(model, p, toks, 2, 9, head_mask=mask, head_fill=fill,
                                    patterns=cache["attention"] if kind == "pattern" else None)
            assert np.isclose(got[l, h], want - clean, atol=1e-5), (kind, l, h)
