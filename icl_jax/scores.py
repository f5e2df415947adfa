"""The paper's measurements, as pure functions of (model, params, inputs).

Each one is jit-able and vmappable over a leading axis of stacked params
(snapshots or ensemble members): jax.vmap(lambda p: icl_score(model, p, ...))(stacked).
Definitions: docs/measurements.md.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax.model import cross_entropy, loss_by_position


# ----------------------------------------------------------------------------- loss

def mean_loss_by_position(model, params, tokens_BT1, **interventions):
    """Mean cross-entropy at each context index [T] over the evaluation set.

    Index i is the prediction made at position i, i.e. of token i+1 from tokens 0..i.
    """
    return loss_by_position(model, params, tokens_BT1, **interventions).mean(axis=0)


def icl_score_from_losses(losses_T, early: int, late: int):
    """In-context learning score: loss at the late index minus loss at the early one."""
    return losses_T[..., late] - losses_T[..., early]


def icl_standard_error(losses_BT, early: int, late: int):
    """Standard error of the ICL score over the evaluation examples: the sample standard
    deviation of each example's loss[late] - loss[early], over sqrt(number of examples).
    What the phase-change rule compares a drop against (256 examples: ~0.1 nats)."""
    diff_B = losses_BT[:, late] - losses_BT[:, early]
    n = diff_B.shape[0]
    return jnp.std(diff_B, ddof=1) / jnp.sqrt(n) if n > 1 else jnp.zeros((), diff_B.dtype)


def icl_score(model, params, tokens_BT1, early: int, late: int, **interventions):
    return icl_score_from_losses(
        mean_loss_by_position(model, params, tokens_BT1, **interventions), early, late)


def clean_run(model, params, tokens_BT1, early: int, late: int):
    """(losses [B, T], cache, ICL score) of one forward pass on tokens_BT1[:, :-1]: the
    clean run that the ablation and every other score of the evaluation set share."""
    logits_BTV, cache = model.apply({"params": params}, tokens_BT1[:, :-1])
    losses_BT = cross_entropy(logits_BTV, tokens_BT1[:, 1:])
    return losses_BT, cache, icl_score_from_losses(losses_BT.mean(0), early, late)


# ----------------------------------------------------------------------------- probe

def make_probe(token_frequencies, n_tokens: int, repeats: int, n_sequences: int,
               exclude_frac: float, bos_token: int, seed: int) -> np.ndarray:
    """Repeated random tokens [n_sequences, 1 + n_tokens * repeats] with a start token first.

    The tokens are drawn without replacement from the tokens seen in training less
    the `exclude_frac` most and least frequent of them (and the start token).
    """
    freq = np.asarray(token_frequencies, np.float64)
    order = np.argsort(-freq, kind="stable")  # most frequent first
    seen = order[freq[order] > 0]
    if len(seen) > n_tokens + 1:  # tokens never seen in training (bytes > 127) have no meaning
        order = seen
    V = len(order)
    cut = int(exclude_frac * V)
    allowed = order[cut:V - cut] if cut else order
    allowed = np.sort(allowed[allowed != bos_token])
    if len(allowed) < n_tokens:
        raise ValueError(f"the probe needs {n_tokens} distinct tokens but only "
                         f"{len(allowed)} remain after exclusions")
    rng = np.random.default_rng([seed, 0x9E37])
    seqs = []
    for _ in range(n_sequences):
        chunk = rng.choice(allowed, size=n_tokens, replace=False)
        seqs.append(np.concatenate([[bos_token], np.tile(chunk, repeats)]))
    return np.asarray(seqs, np.int32)


def prefix_matching_mask(tokens_BT, first_query: int):
    """[B, T, S] True where key s follows an earlier copy of query t's token (s-1 < t)."""
    T = tokens_BT.shape[1]
    prev_BS = jnp.concatenate([jnp.full_like(tokens_BT[:, :1], -1), tokens_BT[:, :-1]], axis=1)
    same_BTS = tokens_BT[:, :, None] == prev_BS[:, None, :]
    t = jnp.arange(T)[:, None]
    s = jnp.arange(T)[None, :]
    return same_BTS & (s - 1 < t) & (s >= 1) & (t >= first_query)


def prefix_matching(model, params, probe_BT, n_tokens: int):
    """Per-head prefix-matching score [L, H] on the repeated-token probe.

    For each query in repeats 2 and later, the attention it pays to the tokens
    that followed earlier copies of its own token; averaged over queries and
    sequences. 1 is perfect induction attention; chance is about 1/position.
    """
    _, cache = model.apply({"params": params}, probe_BT)
    return prefix_matching_from_attention(cache["attention"], probe_BT, n_tokens)


def prefix_matching_from_attention(att_BLHTS, probe_BT, n_tokens: int):
    """prefix_matching from the probe's attention patterns, for callers that have them."""
    first_query = 1 + n_tokens
    mask_BTS = prefix_matching_mask(probe_BT, first_query)
    per_query_BLHT = jnp.einsum("blhts,bts->blht", att_BLHTS, mask_BTS.astype(att_BLHTS.dtype))
    n_queries = probe_BT.shape[1] - first_query
    return per_query_BLHT[..., first_query:].sum(-1).mean(0) / n_queries


def previous_token(model, params, tokens_BT):
    """Per-head previous-token score [L, H]: mean attention from position i to i-1."""
    _, cache = model.apply({"params": params}, tokens_BT)
    return previous_token_from_attention(cache["attention"])


def previous_token_from_attention(att_BLHTS):
    """previous_token from attention patterns [B, L, H, T, S]."""
    sub_diag = jnp.diagonal(att_BLHTS, offset=-1, axis1=-2, axis2=-1)  # [B, L, H, T-1]
    return sub_diag.mean(axis=(0, -1))


# ----------------------------------------------------------------------------- weights
#
# Conventions (TransformerLens, row vectors: a residual vector x is a row, x @ W):
#   W_QK(h) = W_Q[h] @ W_K[h].T   [D, D]: attention score of query x_q on key x_k is x_q W_QK x_k^T
#   W_OV(h) = W_V[h] @ W_O[h]     [D, D]: what the head writes when attending to x is x W_OV
# The paper writes the same circuits with column vectors (M = W_U W_O W_V W_E); the
# row-vector products below are their transposes, which leaves norms and eigenvalues unchanged.
# The weight-based scores ignore biases and LayerNorm.

def _stack_heads(model, params, name):
    """[L, H, ...] stack of one attention weight over layers."""
    return jnp.stack([params[f"block_{l}"]["attn"][name] for l in range(model.cfg.n_layers)])


def ov_products(model, params):
    """[L, H, K, K] W_O W_U W_E W_V per head: the OV circuit E V O U with its factors cycled.

    The vocab x vocab circuit M = W_E W_V W_O W_U has rank <= d_head; its nonzero
    eigenvalues are those of this d_head x d_head product (eig(AB) = eig(BA)).
    """
    W_V = _stack_heads(model, params, "W_V")  # [L, H, D, K]
    W_O = _stack_heads(model, params, "W_O")  # [L, H, K, D]
    UE_DD = params["W_U"] @ params["W_E"]
    return jnp.einsum("lhkd,de,lhej->lhkj", W_O, UE_DD, W_V)


def _eig_ratio(m):
    """Re(sum eig) / sum |eig| over the last two axes, on the host in float64."""
    ev = np.linalg.eigvals(np.asarray(m, np.float64))
    return (ev.real.sum(-1) / np.maximum(np.abs(ev).sum(-1), 1e-30)).astype(np.float32)


def copying_from_ov_products(prod):
    """The copying score [..., L, H] of ov_products' output, computed by numpy on the host:
    what a compiled program returns instead of calling back to the host for eigenvalues
    (an accelerator's program then holds no host callback)."""
    return _eig_ratio(prod)


def copying(model, params):
    """Per-head copying score [L, H] from the weights: Re(sum eig M) / sum |eig M|, in -1..1.

    M = W_E W_V W_O W_U (the OV circuit from tokens to logits, biases and LayerNorm
    ignored). Positive: attending to a token raises that token's logit. The
    eigenvalues come from the small d_head x d_head product (ov_products) and are
    computed by numpy on the host through jax.pure_callback, because jnp.linalg.eig
    only runs on CPU; the function stays jit-able and vmappable.
    """
    prod = ov_products(model, params)
    return jax.pure_callback(_eig_ratio, jax.ShapeDtypeStruct(prod.shape[:-2], jnp.float32),
                             prod, vmap_method="expand_dims")


def copying_empirical(model, params, probe_BT, n_tokens: int):
    """Per-head empirical copying score [L, H] on the repeated-token probe, in 0..1.

    For each query in repeats 2 and later: the head's direct-path logit effect
    e = z W_O W_U (through ln_final's centring and scale when the model has
    LayerNorm; its per-position 1/std does not change the score), mean-centred over
    the vocabulary and passed through ReLU, r = relu(e - mean(e)). The score is the
    share of r that falls on the tokens the head attends to, each weighted by its
    attention relative to the most attended token: sum_v w_v r_v / sum_v r_v with
    w_v = a_v / max a, a_v = attention paid to positions holding token v.
    1 means the head raises only what it attends to.
    """
    _, cache = model.apply({"params": params}, probe_BT)
    return copying_empirical_from_cache(model, params, cache, probe_BT, n_tokens)


def copying_empirical_from_cache(model, params, cache, probe_BT, n_tokens: int):
    """copying_empirical from the probe run's cache ("attention" and "z")."""
    att_BLHTS, z_BLTHK = cache["attention"], cache["z"]
    W_O = _stack_heads(model, params, "W_O")
    out_BLHTD = jnp.einsum("blthk,lhkd->blhtd", z_BLTHK, W_O)
    W_U = params["W_U"]
    if model.cfg.layer_norm:
        out_BLHTD = out_BLHTD - out_BLHTD.mean(-1, keepdims=True)
        W_U = params["ln_final"]["scale"][:, None] * W_U
    eff_BLHTV = out_BLHTD @ W_U
    r = jax.nn.relu(eff_BLHTV - eff_BLHTV.mean(-1, keepdims=True))
    onehot_BSV = jax.nn.one_hot(probe_BT, W_U.shape[-1], dtype=att_BLHTS.dtype)
    a_BLHTV = jnp.einsum("blhts,bsv->blhtv", att_BLHTS, onehot_BSV)
    w = a_BLHTV / jnp.maximum(a_BLHTV.max(-1, keepdims=True), 1e-30)
    per_query = (w * r).sum(-1) / jnp.maximum(r.sum(-1), 1e-30)  # [B, L, H, T]
    return per_query[..., 1 + n_tokens:].mean(axis=(0, -1))


def _fro2_of_product(AtA_XDD, BBt_YDD):
    """||A B||_F^2 = sum (A^T A) * (B B^T), for every pair of leading indices."""
    return jnp.einsum("xde,yde->xy", AtA_XDD, BBt_YDD)


def composition(model, params):
    """Q-, K- and V-composition scores {"q", "k", "v"}, each [L, H, L, H] (earlier, later).

    Entry [l1, h1, l2, h2] (defined for l1 < l2, 0 elsewhere), with row-vector circuits:
      Q: ||W_OV(h1) W_QK(h2)||_F   / (||W_OV(h1)||_F ||W_QK(h2)||_F)   h1 writes what h2's query reads
      K: ||W_OV(h1) W_QK(h2)^T||_F / (||W_OV(h1)||_F ||W_QK(h2)||_F)   h1 writes what h2's key reads
      V: ||W_OV(h1) W_OV(h2)||_F   / (||W_OV(h1)||_F ||W_OV(h2)||_F)   h1 writes what h2's value reads
    Biases, LayerNorm and the positional embeddings are ignored.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    W_Q, W_K, W_V, W_O = (_stack_heads(model, params, n) for n in ("W_Q", "W_K", "W_V", "W_O"))
    QK = jnp.einsum("lhdk,lhek->lhde", W_Q, W_K).reshape(L * H, *W_Q.shape[2:3] * 2)
    OV = jnp.einsum("lhdk,lhke->lhde", W_V, W_O).reshape(L * H, *W_Q.shape[2:3] * 2)
    AtA = jnp.einsum("xdi,xdj->xij", OV, OV)  # OV1^T OV1
    norm = lambda M: jnp.sqrt((M ** 2).sum((-2, -1)))
    n_ov, n_qk = norm(OV), norm(QK)
    layer = jnp.repeat(jnp.arange(L), H)
    later = (layer[:, None] < layer[None, :]).astype(OV.dtype)

    def score(BBt, n_b):
        num = jnp.sqrt(jnp.maximum(_fro2_of_product(AtA, BBt), 0.0))
        s = num / jnp.maximum(n_ov[:, None] * n_b[None, :], 1e-30)
        return (s * later).reshape(L, H, L, H)

    return {"q": score(jnp.einsum("xik,xjk->xij", QK, QK), n_qk),   # B = QK:   B B^T
            "k": score(jnp.einsum("xki,xkj->xij", QK, QK), n_qk),   # B = QK^T: QK^T QK
            "v": score(jnp.einsum("xik,xjk->xij", OV, OV), n_ov)}


# ----------------------------------------------------------------------------- ablations

ABLATIONS = ("pattern", "zero", "mean")


def head_ablation_icl(model, params, tokens_BT1, early: int, late: int, kind: str = "pattern",
                      head_batch: int | None = None, clean=None):
    """Each head's attribution to in-context learning [L, H]: ICL(ablated) - ICL(clean).

    kind "pattern": pattern-preserving, as in the paper: record the clean attention
    patterns, then rerun with the head's z set to zero and every pattern frozen;
    "zero": z set to zero, patterns recomputed; "mean": z replaced by its mean over
    the evaluation examples (per position), patterns recomputed.
    Positive: removing the head makes the model worse at in-context learning.
    head_batch: heads of one layer run at once (None: all of them, vmapped; 1: one after
    another, for bounded memory). clean: (cache, ICL score) of the clean run on
    tokens_BT1[:, :-1], when the caller has them (saves a forward pass).
    """
    if kind not in ABLATIONS:
        raise ValueError(f"ablation kind must be one of {ABLATIONS}, got {kind!r}")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if clean is None:
        clean = clean_run(model, params, tokens_BT1, early, late)[1:]
    cache, clean_icl = clean
    fill = cache["z"].mean(0) if kind == "mean" else jnp.zeros((L, 1, 1, 1), cache["z"].dtype)
    patterns = jax.lax.stop_gradient(cache["attention"]) if kind == "pattern" else None
    masks = 1.0 - jnp.eye(L * H).reshape(L, H, L, H)
    ablated = []
    for layer in range(L):  # a head changes nothing before its layer: start the rerun there
        def one(mask_LH, layer=layer):
            return icl_score(model, params, tokens_BT1, early, late, head_mask=mask_LH,
                             head_fill=fill, patterns=patterns,
                             resid_BTD=cache["resid_pre"][:, layer], start_layer=layer)
        ablated.append(jax.lax.map(one, masks[layer], batch_size=head_batch or H))
    return jnp.stack(ablated) - clean_icl


def icl_with_heads_removed(model, params, tokens_BT1, early: int, late: int, mask_LH,
                          kind: str = "pattern"):
    """(clean ICL score, ICL score with every head where mask_LH is 0 removed at once)."""
    if kind not in ABLATIONS:
        raise ValueError(f"ablation kind must be one of {ABLATIONS}, got {kind!r}")
    _, cache = model.apply({"params": params}, tokens_BT1[:, :-1])
    clean = icl_score(model, params, tokens_BT1, early, late)
    L = model.cfg.n_layers
    fill = cache["z"].mean(0) if kind == "mean" else jnp.zeros((L, 1, 1, 1), cache["z"].dtype)
    patterns = cache["attention"] if kind == "pattern" else None
    return clean, icl_score(model, params, tokens_BT1, early, late, head_mask=mask_LH,
                            head_fill=fill, patterns=patterns)


# ----------------------------------------------------------------------------- PCA input

def pca_token_indices(n_examples: int, n_positions: int, seed: int) -> np.ndarray:
    """One fixed random context index per evaluation example, chosen by `seed`."""
    return np.random.default_rng([seed, 0x5CA]).integers(0, n_positions, n_examples).astype(np.int32)


def per_token_losses(model, params, tokens_BT1, index_B):
    """[B] loss of each example at its own fixed index: one snapshot's vector for the PCA."""
    losses_BT = loss_by_position(model, params, tokens_BT1)
    return jnp.take_along_axis(losses_BT, index_B[:, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- one snapshot

def snapshot_scores(model, params, inputs: dict, early: int, late: int, n_tokens: int,
                    ablation: str = "pattern") -> dict:
    """Every per-snapshot measurement of the analysis, from one clean run on the evaluation
    set and one on the probe (inputs: what evaluation_inputs builds); pure, so it can be
    jitted, vmapped or lax.mapped over stacked snapshots.

    Each score equals its stand-alone function above on the same inputs, but for copying:
    "ov_products" [L, H, K, K] stands in its place, whose eigenvalues the host takes
    (copying_from_ov_products), so that the program holds no host callback on any platform.
    probe_attention [L, H, T, S] is the attention on the first probe sequence, kept for the
    report's figure.
    """
    eval_BT1, probe_BT, index_B = inputs["eval_BT1"], inputs["probe_BT"], inputs["pca_index_B"]
    losses_BT, cache, icl = clean_run(model, params, eval_BT1, early, late)
    _, probe_cache = model.apply({"params": params}, probe_BT)
    return {
        "loss_by_position": losses_BT.mean(0),
        "icl_score": icl,
        "icl_se": icl_standard_error(losses_BT, early, late),
        # each example's own score: the phase-change rule's paired standard error of a
        # difference between snapshots, which share the evaluation set, needs them
        "icl_by_example": losses_BT[:, late] - losses_BT[:, early],
        # each example's mean loss over the context: the paired error of the gap between two
        # models' held-out losses (a claim: the loss "diverges from a one-layer model")
        "loss_by_example": losses_BT.mean(1),
        "per_token_loss": jnp.take_along_axis(losses_BT, index_B[:, None], axis=1)[:, 0],
        "prefix_matching": prefix_matching_from_attention(probe_cache["attention"], probe_BT,
                                                          n_tokens),
        "previous_token": previous_token_from_attention(cache["attention"]),
        # the eigenvalues are the host's (copying_from_ov_products): no callback in here
        "ov_products": ov_products(model, params),
        "copying_empirical": copying_empirical_from_cache(model, params, probe_cache, probe_BT,
                                                          n_tokens),
        "ablation_icl": head_ablation_icl(model, params, eval_BT1, early, late, ablation,
                                          head_batch=1, clean=(cache, icl)),
        "composition": composition(model, params),
        "probe_attention": probe_cache["attention"][0],
    }


# ----------------------------------------------------------------------------- stacking

STACKING = ("vmap", "map")


def default_stacking() -> str:
    """How a chunk of snapshots (or ensemble members) is scored in one program here.

    XLA's CPU code runs vmapped per-snapshot products as slow batched kernels (16
    snapshots vmapped took 1.6x as long as a loop over them); one snapshot after another
    inside the program (lax.map) does not. Accelerators take the vmapped batch.
    """
    return "map" if jax.devices()[0].platform == "cpu" else "vmap"


# ----------------------------------------------------------------------------- inputs

def evaluation_inputs(config, source) -> dict:
    """The fixed inputs every measurement of a run reads, built from its config and data
    source in one place, so that the trainer's scores and the analysis's are the same numbers:
    eval_BT1 [n_examples, context + 1] held-out sequences, probe_BT the repeated-token probe
    (prefix matching, empirical copying), pca_index_B one context index per example (PCA)."""
    c, e = config, config.eval
    return {
        "eval_BT1": source.eval_set(e.n_examples, c.model.context + 1),
        "probe_BT": make_probe(source.token_frequencies(), e.probe_tokens, e.probe_repeats,
                               e.probe_sequences, e.probe_exclude_frac, e.bos_token, c.seed),
        "pca_index_B": pca_token_indices(e.n_examples, c.model.context, c.seed),
    }
