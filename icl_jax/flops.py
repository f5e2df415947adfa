"""Model FLOP utilisation: the FLOPs a training step needs, against the device's peak.

FLOPs count matrix products only (2 per multiply-add), with the attention scores and
their weighted sum counted over the full T x S square (the usual MFU convention, as in
nanoGPT and the PaLM paper); the embedding lookup costs none, the unembedding counts.
"""
from __future__ import annotations

import functools
import time


def forward_flops(m, batch: int, context: int, attention: str = "full") -> int:
    """Matmul FLOPs of one forward pass of the model config `m` on [batch, context] tokens.

    attention "full": the T x S score and value products counted in full (the usual
    MFU convention); "executed": only the query blocks x keys that
    model.causal_attention computes.
    """
    B, T, D, H, V = batch, context, m.d_model, m.n_heads, m.vocab_size
    K = m.d_head or D // H
    if attention == "full":
        ts = T * T
    else:
        from icl_jax.model import QUERY_BLOCK
        ts = sum((min(t0 + QUERY_BLOCK, T) - t0) * min(t0 + QUERY_BLOCK, T)
                 for t0 in range(0, T, QUERY_BLOCK))
    per_layer = 2 * B * T * D * H * K * 4  # x W_Q, x W_K, x W_V, z W_O
    per_layer += 2 * 2 * B * H * ts * K  # q.k and pattern.v
    if m.mlp:
        per_layer += 2 * 2 * B * T * D * m.d_mlp  # W_in, W_out
    return m.n_layers * per_layer + 2 * B * T * D * V  # + unembedding


def train_flops(m, batch: int, context: int, attention: str = "full") -> int:
    """fwd + bwd: the backward pass costs two forward passes' matmuls."""
    return 3 * forward_flops(m, batch, context, attention)


def train_flops_per_token(m) -> int:
    """FLOPs of one training token of the model config `m` at its full context."""
    return train_flops(m, 1, m.context) // m.context


# Dense matrix-product peaks per device in FLOP/s, from the vendors' data sheets; the first
# key that device_kind contains wins (so "TPU v5 lite" is matched before "TPU v5").
PEAKS = {
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12},
    "TPU v5e": {"bfloat16": 197e12},
    "TPU v5p": {"bfloat16": 459e12},
    "TPU v5": {"bfloat16": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12},
    "TPU v6e": {"bfloat16": 918e12},
}


class Peak:
    """The peak FLOP/s of all devices together, and a label saying where it came from."""

    def __init__(self, flops_per_s: float, label: str):
        self.flops_per_s, self.label = flops_per_s, label

    def mfu(self, flops_per_token: float, tokens_per_s: float) -> float:
        return flops_per_token * tokens_per_s / self.flops_per_s


def peak(dtype: str = "float32") -> Peak:
    """The table's peak for this accelerator and dtype (TPUs: bf16, which their MXUs use for
    float32 products too); on a CPU, or an accelerator not in the table, a measured one."""
    import jax
    device = jax.local_devices()[0]
    kind = device.device_kind
    for name, by_dtype in PEAKS.items():
        if name in kind:
            key = dtype if dtype in by_dtype else "bfloat16"
            n = jax.device_count()
            return Peak(by_dtype[key] * n, f"{n} x {_si(by_dtype[key])}FLOP/s {name} "
                        f"{'bf16' if key == 'bfloat16' else 'fp32'} peak")
    measured = measured_matmul_peak()
    # a CPU's devices share its cores, so the peak is the host's, once per process (host)
    if device.platform == "cpu":
        return Peak(measured * jax.process_count(), f"{_si(measured)}FLOP/s measured matmul")
    n = jax.device_count()
    return Peak(measured * n, f"{n} x {_si(measured)}FLOP/s measured matmul ({kind})")


@functools.cache
def measured_matmul_peak(n: int = 512, repeats: int = 5) -> float:
    """FLOP/s of the best of a few float32 n x n products on the first local device (about
    0.1 s on a CPU core, compile included); measured once per process."""
    import jax
    import jax.numpy as jnp
    a = jax.device_put(jnp.ones((n, n), jnp.float32) / n, jax.local_devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "
