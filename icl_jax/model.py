"""The transformer of Olsson et al. (2022), in the notation of the paper.

Shape letters, one meaning each, in every name of this module and its callers:
B batch, T position (of a query), S position (of a key), D d_model, H heads,
K d_head, F d_mlp, V vocabulary, L layers.

Every head's weights sit under their paper names in the parameter tree:
params["block_1"]["attn"]["W_Q"] is [H, D, K] (TransformerLens layout), W_O is
[H, K, D]. The model is a pure function of (params, tokens) and, for the
interpretability measurements, of three optional interventions:

- head_mask [L, H]: 1 keeps a head's output, 0 replaces it with head_fill;
- head_fill [L, T, H, K] (or broadcastable): what a masked head writes instead
  of its z (0 for zero ablation, a dataset mean for mean ablation);
- patterns [B, L, H, T, S]: attention patterns to use instead of the computed
  ones (pattern-preserving ablation freezes them at a clean run's values).

It returns (logits [B, T, V], cache) where cache holds "attention"
[B, L, H, T, S], "z" [B, L, T, H, K] and "resid_pre" [B, L, T, D] (the residual
stream entering each block); under jit, what is not used is not computed.

Precision (model.dtype): parameters, and so the optimizer state, are float32 always;
with "bfloat16" the residual stream and the matrix products run in bfloat16, while
attention scores, softmax, LayerNorm statistics, logits and the loss are float32.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from icl_jax.config import ATTENTION, cudnn_fits

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def smear(k_BSHK, alpha_H):
    """Smeared keys: k_j <- s k_j + (1 - s) k_{j-1}, s = sigmoid(alpha_h); k_0 unchanged."""
    s_H = jax.nn.sigmoid(alpha_H).astype(k_BSHK.dtype)[:, None]
    k_prev = jnp.concatenate([k_BSHK[:, :1], k_BSHK[:, :-1]], axis=1)
    smeared = s_H * k_BSHK + (1 - s_H) * k_prev
    return smeared.at[:, 0].set(k_BSHK[:, 0])


def add_positions(x_BTD, pos_TD):
    """x + pos broadcast over the batch, written as an outer product with ones.

    The same values as x_BTD + pos_TD (XLA folds the product into a broadcast), but the
    gradient for pos becomes a matrix-vector product with ones instead of a reduce over
    the leading batch axis, which XLA:CPU's YNNPACK fusion runs about 20x slower
    (5.5 ms against 0.3 ms for [8, 256, 768] on 2 cores; 22 ms of a 335 ms step of the
    d_model 768 model with shortformer positions).
    """
    return x_BTD + jnp.einsum("b,td->btd", jnp.ones(x_BTD.shape[:1], pos_TD.dtype), pos_TD)


QUERY_BLOCK = 64  # queries per block of causal_attention


def causal_attention(q_BHTK, k_BHSK, v_BHSK, block: int = QUERY_BLOCK):
    """(z [B, H, T, K], pattern [B, H, T, S]) of causal softmax attention; q is pre-scaled.

    Queries go in blocks of `block`, each against only the keys at or before its last
    position, so the masked upper triangle is neither multiplied nor exponentiated
    (about half the work and memory traffic of a full [T, S] score matrix at long
    contexts). Each block's softmax is normalised after the value product, on [t, K]
    rather than [t, S]. The pattern is assembled only if a caller uses it.
    """
    T = q_BHTK.shape[2]
    zs, patterns = [], []
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        scores = jnp.einsum("bhtk,bhsk->bhts", q_BHTK[:, :, t0:t1], k_BHSK[:, :, :t1],
                            preferred_element_type=jnp.float32)  # softmax in float32
        causal = jnp.arange(t0, t1)[:, None] >= jnp.arange(t1)[None, :]
        scores = jnp.where(causal, scores, -jnp.inf)  # the diagonal keeps every row finite
        e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        norm = e.sum(-1, keepdims=True)
        z = jnp.einsum("bhts,bhsk->bhtk", e.astype(v_BHSK.dtype), v_BHSK[:, :, :t1])
        zs.append(z / norm.astype(z.dtype))
        patterns.append(jnp.pad(e / norm, ((0, 0), (0, 0), (0, 0), (0, T - t1))))
    cat = lambda xs: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=2)
    return cat(zs), cat(patterns)


def project(x_BTD, *weights):
    """[x W + b for each (W [H, D, K], b [H, K]) given], each [B, T, H, K].

    Written as one [B*T, D] x [D, n*H*K] matrix product for the n pairs (queries and
    keys read the same input): XLA:CPU runs one wide 2-D product faster than an einsum
    per head tensor (the d_model 256, context 512 training step was 11% slower with
    a separate einsum "btd,hdk->bthk" for W_Q and W_K, and 13% with one for each of
    W_Q, W_K and W_V; measured interleaved in one process against this form).
    """
    B, T, D = x_BTD.shape
    H, _, K = weights[0][0].shape
    n = len(weights)
    W_DnHK = jnp.concatenate([W for W, _ in weights]).transpose(1, 0, 2).reshape(D, n * H * K)
    b_nHK = jnp.concatenate([b for _, b in weights]).reshape(n * H * K)
    y_BTnHK = (x_BTD.reshape(B * T, D) @ W_DnHK + b_nHK).reshape(B, T, n * H, K)
    return [y_BTnHK[:, :, i * H:(i + 1) * H] for i in range(n)]


def attention_kernel(name: str = "auto", platform: str | None = None,
                     dtype: str = "float32", d_head: int = 64) -> str:
    """model.attention resolved for the platform the program is compiled for ("cpu",
    "cuda", "rocm", "tpu"; None: jax's default backend, the one jit compiles for).

    "auto" is our blocked causal_attention on CPU, where XLA's dot_product_attention
    materialises every T x S score (the d_model 768 model's forward and backward took
    1.3x as long with it); on CUDA, cuDNN's fused attention where it takes the model's
    heads (cudnn_fits: bfloat16, d_head a multiple of 8), which never writes the T x S
    scores to memory; elsewhere jax.nn.dot_product_attention's XLA path (jax's default
    implementation: it materialises float32 scores and probabilities for every query-key
    pair). The choice is made when the model is built, never while tracing, so that a
    program exported on this CPU for a GPU or a TPU gets the accelerator's kernel.
    """
    if name not in ATTENTION:
        raise ValueError(f"model.attention must be one of {ATTENTION}, got {name!r}")
    if name == "auto":
        if platform is None:
            platform = jax.default_backend()
            if platform == "gpu":  # CUDA or ROCm: the backend's version string says which
                version = jax.devices()[0].client.platform_version.lower()
                platform = "rocm" if "rocm" in version else "cuda"
        if platform == "cpu":
            return "blocked"
        if platform == "cuda" and cudnn_fits(dtype, d_head):
            return "cudnn"
        return "dot_product_attention"
    return name


class Attention(nn.Module):
    n_heads: int
    d_head: int
    smear_keys: bool = False
    smear_init: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kernel: str = "blocked"  # or "dot_product_attention", "cudnn" (see attention_kernel)

    @nn.compact
    def __call__(self, x_BTD, qk_in_BTD, mask_H, fill_THK, frozen_BHTS):
        D, H, K = x_BTD.shape[-1], self.n_heads, self.d_head
        w_init = nn.initializers.normal(1.0 / math.sqrt(D))
        o_init = nn.initializers.normal(1.0 / math.sqrt(H * K))
        W_Q = self.param("W_Q", w_init, (H, D, K))
        W_K = self.param("W_K", w_init, (H, D, K))
        W_V = self.param("W_V", w_init, (H, D, K))
        W_O = self.param("W_O", o_init, (H, K, D))
        b_Q = self.param("b_Q", nn.initializers.zeros, (H, K))
        b_K = self.param("b_K", nn.initializers.zeros, (H, K))
        b_V = self.param("b_V", nn.initializers.zeros, (H, K))
        b_O = self.param("b_O", nn.initializers.zeros, (D,))
        c = lambda a: a.astype(self.dtype)  # matrix products in the compute dtype

        # qk_in is x, plus the positions for shortformer models (Block adds them)
        # q = x W_Q + b_Q, k = x W_K + b_K, v = x W_V + b_V
        q_BTHK, k_BTHK = project(c(qk_in_BTD), (c(W_Q), c(b_Q)), (c(W_K), c(b_K)))
        (v_BTHK,) = project(c(x_BTD), (c(W_V), c(b_V)))
        if self.smear_keys:
            alpha_H = self.param("smear", nn.initializers.constant(self.smear_init), (H,))
            k_BTHK = smear(k_BTHK, alpha_H)

        # pattern = softmax(causal mask(q k^T / sqrt(d_head))), z = pattern v; our kernel
        # takes heads next to batch, so that each product is one batched matmul
        heads_first = lambda a_BTHK: a_BTHK.swapaxes(1, 2)
        z_BHTK, pattern_BHTS = causal_attention(heads_first(q_BTHK) / math.sqrt(K),
                                                heads_first(k_BTHK), heads_first(v_BTHK))
        z_BTHK = z_BHTK.swapaxes(1, 2)
        if self.kernel in ("dot_product_attention", "cudnn"):
            # z from jax's kernel (XLA's or cuDNN's fused one); causal_attention above then
            # only serves the pattern, which under jit is computed only when a caller uses
            # it (training doesn't)
            z_BTHK = jax.nn.dot_product_attention(
                q_BTHK, k_BTHK, v_BTHK, scale=1.0 / math.sqrt(K), is_causal=True,
                implementation="cudnn" if self.kernel == "cudnn" else None)
        if frozen_BHTS is not None:  # pattern-preserving ablation: z from the given pattern
            z_BTHK = jnp.einsum("bhts,bshk->bthk", c(frozen_BHTS), v_BTHK)

        z_used_BTHK = z_BTHK
        if mask_H is not None:
            m_H1 = c(mask_H)[:, None]
            fill = 0.0 if fill_THK is None else c(fill_THK)
            z_used_BTHK = m_H1 * z_BTHK + (1 - m_H1) * fill
        # out = sum over heads of z W_O
        out_BTD = jnp.einsum("bthk,hkd->btd", z_used_BTHK, c(W_O)) + c(b_O)
        return out_BTD, pattern_BHTS, z_BTHK


class MLP(nn.Module):
    d_mlp: int
    dtype: jnp.dtype = jnp.float32
    out_scale: float = 1.0  # W_out's init std as a multiple of 1 / sqrt(d_mlp)

    @nn.compact
    def __call__(self, x_BTD):
        D = x_BTD.shape[-1]
        h_BTF = nn.Dense(self.d_mlp, dtype=self.dtype, name="W_in",
                         kernel_init=nn.initializers.normal(1.0 / math.sqrt(D)))(x_BTD)
        return nn.Dense(D, dtype=self.dtype, name="W_out",
                        kernel_init=nn.initializers.normal(self.out_scale / math.sqrt(self.d_mlp)))(
                            jax.nn.gelu(h_BTF))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model` section of a config, typed: what the module is built from.

    configs/small.py documents each field; config.validate checks them. Made from a
    config's section (a ConfigDict or a dict) by ModelConfig.of, which names any field it
    does not know. The two defaults are the values that reproduce runs saved before the
    fields existed (config.ADDED_FIELDS, which upgrades saved configs, gives the same)."""
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    mlp: bool
    d_mlp: int
    layer_norm: bool
    positions: str  # "shortformer" (positions enter Q and K only) or "residual"
    pos_init_std: float
    smear_keys: bool
    smear_init: float
    context: int
    vocab_size: int
    dtype: str  # "float32" or "bfloat16"
    mlp_out_init: float = 1.0  # W_out's init std as a multiple of 1 / sqrt(d_mlp)
    attention: str = "auto"  # config.ATTENTION; make_model resolves it for the platform

    @classmethod
    def of(cls, section) -> ModelConfig:
        """`section` (a ModelConfig, a ConfigDict or a dict) as a ModelConfig."""
        if isinstance(section, cls):
            return section
        fields = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown model field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in fields and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"model field(s) {', '.join(missing)} missing")
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Block(nn.Module):
    cfg: ModelConfig
    kernel: str = "blocked"  # model.attention resolved (attention_kernel)

    @nn.compact
    def __call__(self, x_BTD, pos_TD, mask_H, fill_THK, pattern_BHTS):
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        ln = (lambda name: nn.LayerNorm(name=name, dtype=dtype)) if cfg.layer_norm else (
            lambda name: (lambda a: a))
        h_BTD = ln("ln_attn")(x_BTD)
        # Shortformer: positions enter only the query and key inputs.
        qk_in = add_positions(h_BTD, pos_TD) if cfg.positions == "shortformer" else h_BTD
        attn_out, pattern, z = Attention(cfg.n_heads, cfg.d_head, cfg.smear_keys,
                                         cfg.smear_init, dtype, self.kernel, name="attn")(
            h_BTD, qk_in, mask_H, fill_THK, pattern_BHTS)
        x_BTD = x_BTD + attn_out
        if cfg.mlp:
            x_BTD = x_BTD + MLP(cfg.d_mlp, dtype, cfg.mlp_out_init,
                                name="mlp")(ln("ln_mlp")(x_BTD))
        return x_BTD, pattern, z


class Transformer(nn.Module):
    """Decoder-only transformer built from a ModelConfig.

    Build it with make_model, which resolves model.attention into `kernel`."""
    cfg: ModelConfig
    kernel: str = "blocked"

    @nn.compact
    def __call__(self, tokens_BT, head_mask=None, head_fill=None, patterns=None,
                 resid_BTD=None, start_layer: int = 0):
        """resid_BTD, start_layer: run only blocks start_layer.. from this residual stream
        (a cache's "resid_pre"[:, start_layer]); the cache then holds only those blocks."""
        cfg = self.cfg
        dtype = DTYPES[cfg.dtype]
        V, D, T = cfg.vocab_size, cfg.d_model, tokens_BT.shape[1]
        W_E = self.param("W_E", nn.initializers.normal(1.0), (V, D))
        W_pos = self.param("W_pos", nn.initializers.normal(cfg.pos_init_std),
                           (cfg.context, D))
        x_BTD = W_E[tokens_BT].astype(dtype)
        pos_TD = W_pos[:T].astype(dtype)
        if cfg.positions == "residual":
            x_BTD = add_positions(x_BTD, pos_TD)
        if resid_BTD is not None:
            x_BTD = resid_BTD.astype(dtype)

        patterns_out, zs, resids = [], [], []
        for layer in range(start_layer, cfg.n_layers):
            resids.append(x_BTD)
            x_BTD, pattern, z = Block(cfg, self.kernel, name=f"block_{layer}")(
                x_BTD, pos_TD,
                None if head_mask is None else head_mask[layer],
                None if head_fill is None else head_fill[layer],
                None if patterns is None else patterns[:, layer])
            patterns_out.append(pattern)
            zs.append(z)
        if cfg.layer_norm:
            x_BTD = nn.LayerNorm(name="ln_final", dtype=dtype)(x_BTD)
        W_U = self.param("W_U", nn.initializers.normal(1.0 / math.sqrt(D)), (D, V))
        b_U = self.param("b_U", nn.initializers.zeros, (V,))
        logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, W_U.astype(dtype),
                                preferred_element_type=jnp.float32) + b_U  # loss in float32
        cache = {"attention": jnp.stack(patterns_out, axis=1), "z": jnp.stack(zs, axis=1),
                 "resid_pre": jnp.stack(resids, axis=1)}
        return logits_BTV, cache


def make_model(model_config, platform: str | None = None) -> Transformer:
    """Builds the module from a validated `model` config section (a ConfigDict, a dict or a
    ModelConfig), for the platform its programs are compiled for ("cpu", "cuda", "tpu";
    None: jax's default backend)."""
    cfg = ModelConfig.of(model_config)
    return Transformer(cfg, attention_kernel(cfg.attention, platform, cfg.dtype, cfg.d_head))


def init_params(model: Transformer, rng):
    tokens = jnp.zeros((1, model.cfg.context), jnp.int32)
    return model.init(rng, tokens)["params"]


def loss_by_position(model, params, tokens_BT1, **interventions):
    """Cross-entropy [B, T] of predicting tokens[:, 1:] from tokens[:, :-1]."""
    logits_BTV, _ = model.apply({"params": params}, tokens_BT1[:, :-1], **interventions)
    return cross_entropy(logits_BTV, tokens_BT1[:, 1:])


def cross_entropy(logits_BTV, targets_BT):
    """[B, T] cross-entropy of each target under its logits."""
    # logsumexp minus the target's logit: no [B, T, V] log-probabilities are materialised
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BTV, axis=-1) - target_BT
