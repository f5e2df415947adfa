"""icl-jax bench: how fast training, scoring, ensembles, snapshots and data are here.

Every figure is measured in one process together with what it is compared against,
the candidates interleaved repeat by repeat so that a change in the machine's load
hits all of them alike. Each row reports the median over --repeats timed repeats
(after warm-up) and the spread (25th-75th percentile, min-max).

    icl-jax bench                                   # the default suite
    icl-jax bench --suite train --config configs/small.py:layers=2 --json out.json

Model FLOPs are counted analytically (fwd+bwd = 3 x the forward's matmul FLOPs, the
attention's T x S products counted in full, as PaLM and nanoGPT count them) and
divided by the peak of a large matrix product timed in the same repeats (MFU).
The count of what our blocked causal attention actually executes is cross-checked
against XLA's cost analysis of the compiled step.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax import config as config_lib, data as data_lib, device_data, train
from icl_jax import workdir as workdir_lib
from icl_jax.flops import train_flops
from icl_jax.model import QUERY_BLOCK, causal_attention, init_params, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(ROOT, "configs", "small.py")

# The sizes of the default suite: the quick profile's models, a d_model 256 model at a
# long context, and the paper's small shape (d_model 768, 12 heads) at a CPU-sized context.
PRESETS = {
    "small L1": ("layers=1", {}),
    "small L2": ("layers=2", {}),
    "small L3": ("layers=3", {}),
    "d256 T512 L2": ("layers=2", {"model.d_model": 256, "model.context": 512,
                                  "train.batch_size": 16}),
    "d768 H12 T256 L2": ("layers=2", {"model.d_model": 768, "model.n_heads": 12,
                                      "model.context": 256, "train.batch_size": 8}),
    # the paper's shape in bf16 through jax.nn.dot_product_attention: the accelerator row
    "paper L2 bf16 T2048": ("layers=2", {"model.d_model": 768, "model.n_heads": 12,
                                         "model.context": 2048, "train.batch_size": 8,
                                         "model.dtype": "bfloat16",
                                         "model.attention": "dot_product_attention"}),
}
DEFAULT_TRAIN = ("small L2", "d256 T512 L2", "d768 H12 T256 L2")


def default_train() -> tuple:
    """The train suite's models here: on an accelerator also the paper shape in bf16."""
    if jax.default_backend() == "cpu":
        return DEFAULT_TRAIN
    return DEFAULT_TRAIN + ("paper L2 bf16 T2048",)
SUITES = ("default", "train", "score", "ensemble", "checkpoint", "data", "accelerator", "llc",
          "prefetch")
# not in the default run: the accelerator suite has its own output and sizes, the llc
# suite takes minutes (devinterp's loop), and prefetch trains whole runs
OPT_IN = {"accelerator", "llc", "prefetch"}
# the prefetch suite's runs: configs/text.py (windows of a memory-mapped byte corpus)
# and the quick profile's synthetic data, each about a minute a run on 2 cores
DEFAULT_PREFETCH = ((os.path.join(ROOT, "configs", "text.py") + ":layers=2", {"train.steps": 80}),
                    ("small L2", {"train.steps": 800}))


# ----------------------------------------------------------------------------- timing

def interleaved(fns: dict, repeats: int, warmup: int = 1, min_s: float = 0.2) -> dict:
    """{name: seconds per call [repeats]}; each repeat runs every fn in turn.

    A fn is called `n` times per repeat, n chosen in warm-up so a repeat takes about
    min_s; the time per call is the repeat's time over n.
    """
    reps = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(math.ceil(min_s / max(time.perf_counter() - t0, 1e-6))))
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            out[name].append((time.perf_counter() - t0) / reps[name])
    return {k: np.asarray(v) for k, v in out.items()}


def _stats(x):
    x = np.asarray(x, np.float64)
    return {"median": float(np.median(x)), "p25": float(np.percentile(x, 25)),
            "p75": float(np.percentile(x, 75)), "min": float(x.min()), "max": float(x.max())}


def _row(case, metric, values, unit, note="", scale=1.0):
    """A table row from per-repeat values (already in `unit` after `scale`)."""
    return {"case": case, "metric": metric, **_stats(np.asarray(values) * scale), "unit": unit,
            "note": note, "load": os.getloadavg()[0]}


def _note(case, metric, note):
    return {"case": case, "metric": metric, "median": None, "unit": "", "note": note,
            "load": os.getloadavg()[0]}


def matmul_peak_fn(n: int | None = None):
    """(fn, flops): one n^3 matrix product, float32 on CPU, bfloat16 on accelerators."""
    platform_ = jax.devices()[0].platform
    dtype = jnp.float32 if platform_ == "cpu" else jnp.bfloat16
    n = n or (2048 if platform_ == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    return (lambda: f(a).block_until_ready()), 2 * n ** 3


def attention_fns(m, batch: int):
    """({name: fn}, bmm FLOPs): one layer's causal attention core, forward and backward,
    at the model's [B, H, T, K], ours (model.causal_attention) and PyTorch's fused
    scaled_dot_product_attention, on the same random inputs; and the batched product of
    its last query block's scores through XLA and through torch.bmm."""
    import torch
    B, H, T = batch, m.n_heads, m.context
    K = m.d_head or m.d_model // H
    q, k, v, g = (np.random.default_rng(i).normal(size=(B, H, T, K)).astype(np.float32)
                  for i in range(4))
    g_jax = jnp.asarray(g)
    grad = jax.jit(jax.grad(lambda q, k, v: (causal_attention(q, k, v)[0] * g_jax).sum(),
                            argnums=(0, 1, 2)))
    qkv = [jnp.asarray(x) for x in (q, k, v)]
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g)

    def torch_step():
        z = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                             scale=1.0)
        (z * tg).sum().backward()
        for x in (tq, tk, tv):
            x.grad = None

    # the product XLA:CPU is slow at: the last query block's scores, [B*H] x [64 x K] x [K x T]
    a = np.random.default_rng(5).normal(size=(B * H, min(QUERY_BLOCK, T), K)).astype(np.float32)
    b = np.random.default_rng(6).normal(size=(B * H, K, T)).astype(np.float32)
    bmm = jax.jit(lambda x, y: jnp.einsum("nik,nkj->nij", x, y))
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {"jax attention": lambda: jax.block_until_ready(grad(*qkv)),
            "torch attention": torch_step,
            "jax bmm": lambda: jax.block_until_ready(bmm(ja, jb)),
            "torch bmm": lambda: torch.bmm(ta, tb)}, 2 * a.size * T


def torch_matmul_peak_fn(n: int = 2048):
    """(fn, flops): the same float32 n^3 product through PyTorch (MKL / oneDNN on CPU)."""
    import torch
    a = torch.randn(n, n)
    return (lambda: torch.mm(a, a)), 2 * n ** 3


# ----------------------------------------------------------------------------- FLOPs

def xla_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return None if not ca or "flops" not in ca else float(ca["flops"])


# ----------------------------------------------------------------------------- configs

def load_config(spec: str, overrides: dict | None = None):
    """A validated config from 'file.py:arg' (or a PRESETS name) and field overrides."""
    if spec in PRESETS:
        arg, preset = PRESETS[spec]
        spec, overrides = f"{SMALL}:{arg}", {**preset, **(overrides or {})}
    return config_lib.load_validated(spec, overrides)


def _name(config):
    m, t = config.model, config.train
    return f"L{m.n_layers} d{m.d_model} H{m.n_heads} T{m.context} B{t.batch_size}"


def _batch(config, k: int | None = None, step: int = 0):
    source = data_lib.make_source(config)
    B, S = config.train.batch_size, config.model.context + 1
    if k is None:
        return source.batch(step, B, S)
    return np.stack([source.batch(step + i, B, S) for i in range(k)])


class JaxTrainer:
    """Our compiled training step on a fixed batch; call() runs one step and waits."""

    def __init__(self, config, ensemble: int | None = None):
        self.config, t = config, config.train
        self.model = make_model(config.model)
        self.tx = train.make_optimizer(t)
        mesh = train.make_mesh()
        self.step = train.make_train_step(self.model, self.tx, mesh, t, ensemble=bool(ensemble))
        if ensemble:
            states = [train.init_state(self.model, self.tx, config.seed + i, t)
                      for i in range(ensemble)]
            state = jax.tree.map(lambda *a: jnp.stack(a), *states)
            spec = jax.sharding.PartitionSpec(None, "data")
        else:
            state = train.init_state(self.model, self.tx, config.seed, t)
            spec = jax.sharding.PartitionSpec("data")
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state = jax.device_put(state, rep)
        self.batch = jax.device_put(_batch(config, ensemble),
                                    jax.sharding.NamedSharding(mesh, spec))
        self.compiled = self.step.lower(self.state, self.batch).compile()

    def __call__(self):
        self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)

    def memory_bytes(self) -> int | None:
        mem = self.compiled.memory_analysis()
        if mem is None:
            return None
        return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes


# ----------------------------------------------------------------------------- PyTorch

def torch_reference_class():
    """The same architecture as a plain PyTorch module (attention-only or with MLP, no
    LayerNorm, no smeared keys), with our parameter names and layouts."""
    import torch
    import torch.nn.functional as F

    class TorchTransformer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            D, H, V = m.d_model, m.n_heads, m.vocab_size
            K = m.d_head or D // H
            self.m, self.H, self.K = m, H, K
            P = lambda *shape, std=None: torch.nn.Parameter(  # noqa: E731
                torch.randn(*shape) * std if std else torch.zeros(*shape))
            self.W_E, self.W_pos = P(V, D, std=1.0), P(m.context, D, std=m.pos_init_std)
            self.blocks = torch.nn.ModuleList()
            for _ in range(m.n_layers):
                b = torch.nn.Module()
                for n in ("W_Q", "W_K", "W_V"):
                    setattr(b, n, P(H, D, K, std=D ** -0.5))
                b.W_O = P(H, K, D, std=(H * K) ** -0.5)
                b.b_Q, b.b_K, b.b_V, b.b_O = P(H, K), P(H, K), P(H, K), P(D)
                if m.mlp:
                    b.W_in, b.W_out = torch.nn.Linear(D, m.d_mlp), torch.nn.Linear(m.d_mlp, D)
                self.blocks.append(b)
            self.W_U, self.b_U = P(D, V, std=D ** -0.5), P(V)

        def forward(self, tokens_BT):
            B, T = tokens_BT.shape
            x = self.W_E[tokens_BT]
            pos = self.W_pos[:T]
            if self.m.positions == "residual":
                x = x + pos
            for b in self.blocks:
                qk_in = x + pos if self.m.positions == "shortformer" else x
                q = torch.einsum("btd,hdk->bhtk", qk_in, b.W_Q) + b.b_Q[:, None]
                k = torch.einsum("btd,hdk->bhtk", qk_in, b.W_K) + b.b_K[:, None]
                v = torch.einsum("btd,hdk->bhtk", x, b.W_V) + b.b_V[:, None]
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + torch.einsum("bhtk,hkd->btd", z, b.W_O) + b.b_O
                if self.m.mlp:
                    x = x + b.W_out(F.gelu(b.W_in(x), approximate="tanh"))
            return x @ self.W_U + self.b_U

    return TorchTransformer


def torch_reference(m, params=None):
    """A TorchTransformer for model config m, with our params copied in when given."""
    import torch
    if m.layer_norm or m.smear_keys:
        raise NotImplementedError("the PyTorch reference has no LayerNorm and no smeared keys")
    net = torch_reference_class()(m)
    if params is not None:
        with torch.no_grad():
            t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731
            for n in ("W_E", "W_pos", "W_U", "b_U"):
                getattr(net, n).copy_(t(params[n]))
            for i, b in enumerate(net.blocks):
                p = params[f"block_{i}"]
                for n, v in p["attn"].items():
                    getattr(b, n).copy_(t(v))
                if m.mlp:
                    for n in ("W_in", "W_out"):
                        getattr(b, n).weight.copy_(t(p["mlp"][n]["kernel"]).T)
                        getattr(b, n).bias.copy_(t(p["mlp"][n]["bias"]))
    return net


def transformer_lens_model(m):
    """TransformerLens 3.x HookedTransformer of the same shape (attention-only, no LN)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    if m.mlp or m.layer_norm or m.smear_keys:
        raise NotImplementedError("the TransformerLens row is attention-only without LayerNorm")
    cfg = HookedTransformerConfig(
        n_layers=m.n_layers, d_model=m.d_model, n_ctx=m.context, n_heads=m.n_heads,
        d_head=m.d_head or m.d_model // m.n_heads, d_vocab=m.vocab_size, attn_only=True,
        act_fn="gelu", normalization_type=None,
        positional_embedding_type="shortformer" if m.positions == "shortformer" else "standard",
        device="cpu", seed=0)
    return HookedTransformer(cfg)


def torch_trainer(net, config, compile_: bool = False):
    """A standard PyTorch AdamW loop (with the config's clipping) on a fixed batch."""
    import torch
    import torch.nn.functional as F
    t = config.train
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=(t.b1, t.b2),
                            weight_decay=t.weight_decay)
    fwd = torch.compile(net) if compile_ else net
    tokens = torch.from_numpy(_batch(config).astype(np.int64))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]

    def step():
        logits = fwd(inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip)
        opt.step()
        return loss.item()

    return step


TORCH_THREADS = [None]  # None: every core; set by run(torch_threads=...)


def _set_torch_threads():
    # With every core busy elsewhere, OpenMP's spinning barriers can make 2 threads 10-30x
    # slower than 1; --torch-threads picks the count.
    import torch
    torch.set_num_threads(TORCH_THREADS[0] or os.cpu_count() or 1)


def _torch_candidates(config, rows, case):
    """{name: step fn} of the PyTorch rows that can run here; a note row for each that can't."""
    out = {}
    try:
        import torch  # noqa: F401
    except ImportError:
        rows.append(_note(case, "PyTorch rows", "torch not installed (pip install "
                          "'icl_jax[bench]')"))
        return out
    m = config.model
    try:
        out["torch eager"] = torch_trainer(torch_reference(m), config)
        out["torch.compile"] = torch_trainer(torch_reference(m), config, compile_=True)
    except NotImplementedError as e:
        rows.append(_note(case, "PyTorch rows", f"skipped: {e}"))
    try:
        out["TransformerLens"] = torch_trainer(transformer_lens_model(m), config)
    except ImportError:
        rows.append(_note(case, "TransformerLens", "transformer_lens not installed "
                          "(pip install 'icl_jax[bench]')"))
    except NotImplementedError as e:
        rows.append(_note(case, "TransformerLens", f"skipped: {e}"))
    _set_torch_threads()
    for name, fn in list(out.items()):
        try:
            fn()  # torch.compile can fail without a C++ toolchain: skip, don't crash
        except Exception as e:  # noqa: BLE001
            rows.append(_note(case, name, f"skipped: {type(e).__name__}: {str(e)[:120]}"))
            del out[name]
    return out


# ----------------------------------------------------------------------------- suites

def bench_train(config, repeats: int, torch_rows: bool = True) -> list:
    """Tokens/s and MFU of our step; PyTorch, torch.compile and TransformerLens beside it."""
    case, rows = _name(config), []
    m, t = config.model, config.train
    tokens = t.batch_size * m.context
    ours = JaxTrainer(config)
    peak_fn, peak_flops = matmul_peak_fn()
    flops = train_flops(m, t.batch_size, m.context)
    executed = train_flops(m, t.batch_size, m.context, "executed")
    xla = xla_flops(ours.compiled)  # of the per-device program of the data-parallel step
    xla = xla and xla * jax.device_count()
    fns = {"peak": peak_fn, "jax": ours}
    peers = _torch_candidates(config, rows, case) if torch_rows else {}
    fns.update(peers)
    if peers and jax.devices()[0].platform == "cpu":
        fns["torch peak"] = torch_matmul_peak_fn()[0]
        attention, bmm_flops = attention_fns(m, t.batch_size)
        fns.update(attention)
    times = interleaved(fns, repeats)
    # The device's peak is the faster of the two libraries' products, repeat by repeat:
    # XLA:CPU's own GEMM and PyTorch's MKL differ by up to 20% on the same core.
    peak = peak_flops / times["peak"]
    rows.append(_row(case, "matmul peak", peak, "GFLOP/s", "2048^3 float32 in the same repeats"
                     if jax.devices()[0].platform == "cpu" else "bf16 matmul", 1e-9))
    if "torch peak" in times:
        torch_peak = peak_flops / times["torch peak"]
        rows.append(_row(case, "torch matmul peak", torch_peak, "GFLOP/s",
                         "the same product through PyTorch (MKL), same repeats", 1e-9))
        rows.append(_row(case, "XLA / torch matmul", peak / torch_peak, "x",
                         "the two libraries' GEMM on the same product"))
        peak = np.maximum(peak, torch_peak)
    peak_note = "of the faster matmul peak" if "torch peak" in times else "of the matmul peak"
    rows.append(_row(case, "jax train", tokens / times["jax"], "tok/s",
                     f"{times['jax'].min() * 1e3:.1f} ms/step at best"))
    rows.append(_row(case, "jax MFU", flops / times["jax"] / peak, "%",
                     f"{flops / 1e9:.2f} GFLOP/step (full T x S), {peak_note}", 100))
    if xla:
        rows.append({**_note(case, "FLOPs check", f"executed analytic {executed / 1e9:.3f} vs "
                             f"XLA cost analysis {xla / 1e9:.3f} GFLOP/step "
                             f"({100 * (xla / executed - 1):+.1f}%)"),
                     "analytic_executed": executed, "xla": xla, "analytic_full": flops})
    if "jax attention" in times and "torch eager" in times:
        ja, ta = times["jax attention"], times["torch attention"]
        rows.append(_row(case, "attention fwd+bwd, jax", ja, "ms", "one layer's causal "
                         "attention core (model.causal_attention)", 1e3))
        rows.append(_row(case, "attention fwd+bwd, torch", ta, "ms",
                         "scaled_dot_product_attention(is_causal=True), same inputs", 1e3))
        gap = times["jax"] - times["torch eager"]
        share = m.n_layers * (ja - ta) / gap
        rows.append(_row(case, "attention share of gap", share, "%",
                         f"{m.n_layers} layers x (jax - torch attention) / (jax - torch eager "
                         "step); meaningful only when the step is slower", 100))
        K = m.d_head or m.d_model // m.n_heads
        q_rows = min(QUERY_BLOCK, m.context)
        shape = f"{t.batch_size * m.n_heads} x [{q_rows} x {K}] x [{K} x {m.context}]"
        rows.append(_row(case, "batched matmul, jax", bmm_flops / times["jax bmm"], "GFLOP/s",
                         f"{shape}: the last query block's scores", 1e-9))
        rows.append(_row(case, "batched matmul, torch.bmm", bmm_flops / times["torch bmm"],
                         "GFLOP/s", "the same product", 1e-9))
    for name in peers:
        rows.append(_row(case, f"{name} train", tokens / times[name], "tok/s"))
        rows.append(_row(case, f"{name} MFU", flops / times[name] / peak, "%",
                         f"same FLOPs, {peak_note}", 100))
        rows.append(_row(case, f"jax / {name}", times[name] / times["jax"], "x",
                         "tokens/s ratio, per repeat"))
    return rows


def _tl_hooks_scorer(model, trees, inputs, key, rows, case):
    """A fn scoring every snapshot with tl_check.score_with_hooks, its HookedTransformers built
    here, outside the timing; None and a note row where TransformerLens can't run."""
    try:
        import torch
        import transformer_lens  # noqa: F401
        from icl_jax import tl_check
    except ImportError:
        rows.append(_note(case, "TransformerLens hooks", "transformer_lens not installed "
                          "(pip install 'icl_jax[bench]')"))
        return None
    try:
        tls = [tl_check.hooked_transformer(t, model.cfg) for t in trees]
    except NotImplementedError as e:
        rows.append(_note(case, "TransformerLens hooks", f"skipped: {e}"))
        return None
    _set_torch_threads()
    tokens = tuple(torch.from_numpy(np.array(inputs[k])).long()  # a writable copy
                   for k in ("eval_BT1", "probe_BT", "pca_index_B"))
    return lambda: [tl_check.score_with_hooks(tl, *tokens, *key) for tl in tls]


def bench_score(config, repeats: int, n_snapshots: int = 16) -> list:
    """All snapshots scored in one call (vmapped, and lax.map) against a Python loop over them,
    and against a loop scoring each with TransformerLens hooks (tl_check.py)."""
    from icl_jax import analysis, scores
    case, rows = f"{_name(config)} x{n_snapshots} snapshots", []
    model, e = make_model(config.model), config.eval
    trees = [init_params(model, jax.random.key(i)) for i in range(n_snapshots)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *trees)
    inputs = scores.evaluation_inputs(config, data_lib.make_source(config))
    inputs = {k: jnp.asarray(x) for k, x in inputs.items()}
    key = (e.icl_early_index, e.icl_late_index, e.probe_tokens, "pattern")
    vmapped, mapped = analysis.scorer(model, *key, "vmap"), analysis.scorer(model, *key, "map")
    single = analysis.scorer(model, *key, None)
    fns = {
        "vmapped": lambda: jax.block_until_ready(vmapped(stacked, inputs)),
        "mapped": lambda: jax.block_until_ready(mapped(stacked, inputs)),
        "loop": lambda: [jax.block_until_ready(single(p, inputs)) for p in trees],
    }
    tl = _tl_hooks_scorer(model, trees, inputs, key, rows, case)
    if tl is not None:
        fns["TL hooks"] = tl
    times = interleaved(fns, repeats, min_s=0)
    rows.append(_row(case, "score vmapped", times["vmapped"], "s"))
    rows.append(_row(case, "score lax.map", times["mapped"], "s"))
    rows.append(_row(case, "score loop", times["loop"], "s"))
    rows.append(_row(case, "loop / vmapped", times["loop"] / times["vmapped"], "x"))
    rows.append(_row(case, "loop / lax.map", times["loop"] / times["mapped"], "x",
                     f"analyze uses {scores.default_stacking()} here"))
    if "TL hooks" in times:
        rows.append(_row(case, "score TransformerLens hooks", times["TL hooks"], "s",
                         f"loop of tl_check.score_with_hooks over the {n_snapshots} snapshots; "
                         "HookedTransformers built before timing, only scoring timed"))
        rows.append(_row(case, "TL hooks / lax.map", times["TL hooks"] / times["mapped"], "x",
                         "TransformerLens time over the lax.map call's, per repeat "
                         "(> 1: TransformerLens slower)"))
    return rows


def bench_ensemble(config, repeats: int, sizes=(4, 8)) -> list:
    """K members in one vmapped step against K sequential steps of one member."""
    case, rows = _name(config), []
    tokens = config.train.batch_size * config.model.context
    single = JaxTrainer(config)
    ens = {k: JaxTrainer(config, ensemble=k) for k in sizes}
    fns = {"single": single, **{f"K={k}": e for k, e in ens.items()}}
    times = interleaved(fns, repeats)
    for k in sizes:
        rows.append(_row(case, f"ensemble K={k}", k * tokens / times[f"K={k}"], "tok/s"))
        rows.append(_row(case, f"K={k} vmapped / sequential", k * times["single"] /
                         times[f"K={k}"], "x", "tokens/s ratio"))
    mem = {k: e.memory_bytes() for k, e in ens.items()}
    if all(mem.values()) and len(sizes) >= 2:
        k0, k1 = sizes[0], sizes[-1]
        per = (mem[k1] - mem[k0]) / (k1 - k0)
        base = mem[k0] - k0 * per
        avail = _available_memory()
        if per > 0 and avail:
            k_max = int((0.8 * avail - base) // per)
            rows.append(_note(case, "largest ensemble", f"K <= {k_max:,} by the compiled step's "
                              f"memory ({per / 2**20:.2f} MiB per member, 80% of "
                              f"{avail / 2**30:.1f} GiB available)"))
    return rows


def _available_memory():
    try:
        stats = jax.devices()[0].memory_stats()
        if stats and "bytes_limit" in stats:
            return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None


def bench_checkpoint(config, repeats: int) -> list:
    """Step-time overhead of asynchronous orbax snapshots at the default schedule."""
    from icl_jax import checkpoints
    case, rows = _name(config), []
    t, ck = config.train, config.checkpoint
    ours = JaxTrainer(config)
    every = ck.every
    tmp = tempfile.mkdtemp(prefix="icl_jax_bench_")
    store = checkpoints.Store(tmp, 0, True)
    config_dict = config.to_dict()
    counter, blocking = [0], []

    def run(save: bool):
        def go():
            for _ in range(every):
                ours()
            if save:  # one snapshot per `every` steps, as the default schedule keeps
                counter[0] += 1
                t0 = time.perf_counter()
                store.save(counter[0], ours.state, config_dict, force=True)
                blocking.append(time.perf_counter() - t0)
        return go

    try:
        times = interleaved({"no snapshots": run(False), "snapshots": run(True)}, repeats,
                            min_s=0)
        # the last asynchronous save still running is waited for, as the trainer does at exit
        t0 = time.perf_counter()
        store.wait()
        tail = time.perf_counter() - t0
    finally:
        store.close()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    per_save = times["snapshots"] - times["no snapshots"]
    rows.append(_row(case, "step, no snapshots", times["no snapshots"] / every, "ms", scale=1e3))
    rows.append(_row(case, "step, async snapshots", times["snapshots"] / every, "ms",
                     f"one every {every} steps", 1e3))
    n_snap = len(checkpoints.snapshot_steps(t.steps, ck.every, ck.log_spaced))
    overhead = (n_snap * per_save + tail) / (t.steps * times["no snapshots"] / every)
    rows.append(_row(case, "snapshot overhead", overhead, "%",
                     f"{n_snap} snapshots in {t.steps} steps (default schedule); "
                     "difference of the two rows above", 100))
    share = n_snap * np.median(blocking) / (t.steps * np.median(times["no snapshots"]) / every)
    rows.append(_row(case, "save() blocks the loop", np.asarray(blocking), "ms",
                     f"x {n_snap} snapshots = {100 * share:.2f}% of the run's step time", 1e3))
    return rows


def data_pipelines(config, workdir=None) -> dict:
    """{"host": numpy's batch of the next step, "device": the same drawn by device_data on
    the default device (jitted, waited for; only for data it can make)}: one global batch
    each call."""
    source = data_lib.make_source(config, workdir)
    b, s = config.train.batch_size, config.model.context + 1
    host_steps, device_steps = itertools.count(1), itertools.count(1)
    fns = {"host": lambda: source.batch(next(host_steps), b, s)}
    if isinstance(source, data_lib.SyntheticSource) and source.placement == "uniform":
        gen = device_data.DeviceSynthetic(source)
        inputs = jax.device_put(gen.inputs())
        make = jax.jit(lambda inputs, step: gen.batch(inputs, step, b))
        fns["device"] = lambda: make(inputs, np.int32(next(device_steps))).block_until_ready()
    return fns


def _auto_pipeline(config) -> str:
    """The pipeline data.generate gives training on this platform."""
    use = device_data.use_device(config.data, jax.devices()[0].platform)
    return "device" if use else "host"


def bench_data(config, repeats: int) -> list:
    """The data pipelines' tokens/s (numpy's on the host, device_data's on the device)
    against the training step's."""
    case, rows = _name(config), []
    t, m = config.train, config.model
    tokens = t.batch_size * m.context
    pipelines = data_pipelines(config)
    times = interleaved({**pipelines, "train": JaxTrainer(config)}, repeats)
    for name in pipelines:
        rows.append(_row(case, f"data ({config.data.name}, {name})", tokens / times[name],
                         "tok/s"))
        rows.append(_row(case, f"{name} / train", times["train"] / times[name], "x",
                         "how many times faster it makes tokens than training consumes them"))
    auto = _auto_pipeline(config)
    rows.append(_row(case, "data / train", times["train"] / times[auto], "x",
                     f"the pipeline data.generate={config.data.generate!r} trains on here: {auto}"))
    return rows


def bench_prefetch(config, repeats: int) -> list:
    """Whole runs of train_and_evaluate with the host batches made ahead in a thread
    (train.PREFETCH_BATCHES) against made before each step, interleaved run by run;
    tokens/s from each run's own log, its first and last logged spans left out (warm-up;
    the last one holds the final evaluation). Runs train.steps steps (100 when the config
    asks for more than 2,000)."""
    case, rows = f"{_name(config)} {config.data.name}", []
    c = config.copy_and_resolve_references()
    steps = c.train.steps if c.train.steps <= 2000 else 100
    c.train.steps, c.train.log_every = steps, max(steps // 8, 10)
    c.train.eval_every = c.checkpoint.every = steps
    c.checkpoint.log_spaced = 0
    config_lib.validate(c)
    depths = {"synchronous": 0, "prefetched": train.PREFETCH_BATCHES or 2}
    rates = {name: [] for name in depths}
    saved = train.PREFETCH_BATCHES
    try:
        for _ in range(repeats):
            for name, depth in depths.items():
                train.PREFETCH_BATCHES = depth
                with tempfile.TemporaryDirectory() as wd:
                    train.train_and_evaluate(c, wd, progress=False)
                    spans = [r for r in workdir_lib.read_metrics(wd) if r.get("tokens_per_s")]
                pairs = list(zip(spans[:-1], spans[1:]))[:-1]  # (previous, span), inner
                if not pairs:
                    raise ValueError(f"bench prefetch: {steps} steps leave no inner timed span; "
                                     "raise --config.train.steps")
                tokens = [r["tokens"] - p["tokens"] for p, r in pairs]
                seconds = sum(n / r["tokens_per_s"] for n, (_, r) in zip(tokens, pairs))
                rates[name].append(sum(tokens) / seconds)
    finally:
        train.PREFETCH_BATCHES = saved
    for name in depths:
        rows.append(_row(case, f"train, batches {name}", rates[name], "tok/s",
                         f"{steps} steps a run, log every {c.train.log_every}"))
    ratio = np.asarray(rates["prefetched"]) / np.asarray(rates["synchronous"])
    rows.append(_row(case, "prefetched / synchronous", ratio, "x", "tokens/s ratio, per repeat"))
    source, t = data_lib.make_source(c), c.train
    step = [0]

    def batch():
        step[0] += 1
        source.batch(step[0], t.batch_size, c.model.context + 1)

    data_s = interleaved({"data": batch}, repeats)["data"]
    rows.append(_row(case, f"data ({c.data.name}) alone", t.batch_size * c.model.context
                     / data_s, "tok/s", "source.batch of the whole batch, on the host"))
    return rows


# ----------------------------------------------------------------------------- accelerator

PAPER = os.path.join(ROOT, "configs", "paper.py")
# Everything shrunk, so that a CPU test runs the whole accelerator suite in seconds.
TINY_MODEL = {"model.d_model": 32, "model.n_heads": 2, "model.d_head": 16, "model.d_mlp": 64,
              "model.context": 32, "model.vocab_size": 64, "train.batch_size": 8,
              "eval.n_examples": 8, "eval.icl_early_index": 2, "eval.icl_late_index": 20,
              "eval.probe_tokens": 7, "eval.probe_sequences": 2, "data.segment_len_min": 3,
              "data.segment_len_max": 8}
# (metric, target as text, test of the median) for the rows that have a target on an H100/H200
ACCELERATOR_TARGETS = {
    "paper MFU": (">= 40%", lambda x: x >= 40),
    "K=64 summed / one": (">= 20x", lambda x: x >= 20),
    "vmapped / loop": (">= 5x", lambda x: x >= 5),
    "data / step": (">= 5x", lambda x: x >= 5),
    "reproduce --profile quick": ("< 120 s", lambda x: x < 120),
}


def _accelerator_configs(tiny: bool):
    """(paper, quick, paper-with-its-own-data) configs of the accelerator suite.

    The paper row trains on synthetic tokens of the paper's vocabulary (what the tokens
    are does not change the speed); the data row reads the paper profile's own data.
    """
    shrink = TINY_MODEL if tiny else {}
    paper = load_config(f"{PAPER}:layers=2", {"train.batch_size": 16, **shrink,
                                              "data.name": "synthetic"})
    paper_data = load_config(f"{PAPER}:layers=2", {**shrink, **(
        {"data.tokenizer": "bytes", "model.vocab_size": 257} if tiny else {})})
    quick = load_config("small L2", shrink)
    return paper, quick, paper_data


def _accelerator_rows(repeats: int, tiny: bool, with_reproduce: bool) -> list:
    from icl_jax import analysis, scores
    rows = []
    paper, quick, paper_data = _accelerator_configs(tiny)

    # (1) the paper's shape: tokens/s and MFU against a bf16 matmul timed alongside
    m, t = paper.model, paper.train
    paper_step = JaxTrainer(paper)
    peak_fn, peak_flops = matmul_peak_fn(256 if tiny else None)
    times = interleaved({"peak": peak_fn, "paper": paper_step}, repeats)
    case = f"paper {_name(paper)} {m.dtype}"
    tokens = t.batch_size * m.context
    rows.append(_row(case, "matmul peak", peak_flops / times["peak"], "TFLOP/s",
                     f"{'bfloat16' if jax.default_backend() != 'cpu' else 'float32'} "
                     "square product, same repeats", 1e-12))
    paper_tok_s = tokens / times["paper"]
    rows.append(_row(case, "paper train", paper_tok_s, "tok/s",
                     f"attention: {paper_step.model.kernel}"))
    rows.append(_row(case, "paper MFU", train_flops(m, t.batch_size, m.context) / times["paper"]
                     / (peak_flops / times["peak"]), "%", "full T x S FLOPs over the peak", 100))

    # (2) ensembles of the quick model in one program against one member
    sizes = (2, 4) if tiny else (4, 16, 64)
    one = JaxTrainer(quick)
    ensembles = {k: JaxTrainer(quick, ensemble=k) for k in sizes}
    times = interleaved({"one": one, **{f"K={k}": e for k, e in ensembles.items()}}, repeats)
    case, tokens = f"quick {_name(quick)}", quick.train.batch_size * quick.model.context
    rows.append(_row(case, "one member train", tokens / times["one"], "tok/s"))
    for k in sizes:
        rows.append(_row(case, f"K={k} summed", k * tokens / times[f"K={k}"], "tok/s"))
        rows.append(_row(case, f"K={k} summed / one", k * times["one"] / times[f"K={k}"], "x",
                         f"{k} would be perfect scaling"))
    quick_step_s = times["one"]

    # (3) scoring stacked snapshots in one vmapped call against a Python loop over them
    n = 4 if tiny else 64
    model = make_model(quick.model)
    inputs = scores.evaluation_inputs(quick, data_lib.make_source(quick))
    inputs = jax.tree.map(jnp.asarray, inputs)
    trees = [init_params(model, jax.random.key(i)) for i in range(n)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *trees)
    e = quick.eval  # the analysis's own scorer (scores.snapshot_scores), both ways
    vmapped, single = (analysis.scorer(model, e.icl_early_index, e.icl_late_index,
                                       e.probe_tokens, stacking=s) for s in ("vmap", None))
    times = interleaved({
        "vmapped": lambda: jax.block_until_ready(vmapped(stacked, inputs)),
        "loop": lambda: [jax.block_until_ready(single(p, inputs)) for p in trees]},
        repeats, min_s=0)
    case = f"quick x{n} snapshots"
    rows.append(_row(case, "score vmapped", times["vmapped"], "s"))
    rows.append(_row(case, "score loop", times["loop"], "s"))
    rows.append(_row(case, "vmapped / loop", times["loop"] / times["vmapped"], "x",
                     "loop time over vmapped time, per repeat"))

    # (4) the data pipelines against the step, both profiles: tokens/s against tokens/s;
    # "data" is the pipeline training uses here (data.generate), the others are beside it
    for name, config, step_tok_s in (("quick", quick, tokens / quick_step_s),
                                     ("paper", paper_data, paper_tok_s)):
        with tempfile.TemporaryDirectory(prefix="icl_jax_bench_") as tmp:
            pipelines = data_pipelines(config, tmp)  # text: the tokenizer is built here
        b = config.train.batch_size
        times = interleaved(pipelines, repeats)
        auto = _auto_pipeline(config)
        case = f"{name} {_name(config)} {config.data.name}"
        rows.append(_row(case, "step", step_tok_s, "tok/s", "from the rows above"))
        for pipe in sorted(pipelines, key=lambda p: p != auto):
            data_tok_s = b * config.model.context / times[pipe]
            label = "data" if pipe == auto else f"{pipe} data"
            rows.append(_row(case, label, data_tok_s, "tok/s", f"made on the {pipe}"))
            rows.append(_row(case, f"{label} / step", data_tok_s / np.median(step_tok_s), "x",
                             "how many times faster the pipeline makes tokens than the step "
                             "uses them"))

    # (5) the whole quick reproduction, in a fresh process
    if with_reproduce:
        import subprocess
        with tempfile.TemporaryDirectory(prefix="icl_jax_reproduce_") as tmp:
            cmd = [sys.executable, "-m", "icl_jax", "reproduce", "--profile", "quick",
                   "--workdir", tmp, "--quiet"]
            if tiny:
                cmd += [f"--config.{k}={v}" for k, v in TINY_MODEL.items()] + [
                    "--config.train.steps=4"]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            rows.append(_row("quick reproduction", "reproduce --profile quick",
                             [time.perf_counter() - t0], "s", "wall time, one run"))
    return rows


def bench_accelerator(out_dir: str, repeats: int = 3, tiny: bool = False,
                      with_reproduce: bool = False, out=None) -> dict:
    """The accelerator suite: writes accelerator.json and accelerator.md to out_dir.

    Rows with a target (ACCELERATOR_TARGETS, for an H100 or H200) say whether the median
    meets it; on other devices the targets are shown but not judged.
    """
    out = out or sys.stdout
    rows = _accelerator_rows(repeats, tiny, with_reproduce)
    gpu = "H100" in str(jax.devices()[0]) or "H200" in str(jax.devices()[0])
    for r in rows:
        if r["metric"] in ACCELERATOR_TARGETS and r.get("median") is not None:
            text, ok = ACCELERATOR_TARGETS[r["metric"]]
            r["target"] = text
            r["met"] = bool(ok(r["median"])) if gpu else None
    meta = {"devices": [str(d) for d in jax.devices()], "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "repeats": repeats, "tiny": tiny, "suite": "accelerator",
            "command": " ".join(["icl-jax"] + sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None}
    result = {"meta": meta, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "accelerator.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"{meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, median of "
             f"{repeats} repeats{' (tiny)' if tiny else ''}", "",
             "| case | metric | median | IQR | unit | target | met | note |",
             "| --- | --- | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
        lines.append(f"| {r['case']} | {r['metric']} | {_fmt(r['median'])} | {_fmt(r['p25'])} - "
                     f"{_fmt(r['p75'])} | {r['unit']} | {r.get('target', '')} | {met} | "
                     f"{r['note']} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "accelerator.md"), "w") as f:
        f.write(table)
    print(table, file=out, flush=True)
    return result


def bench_llc(config, n_snapshots: int = 16, chains: int = 8, draws: int = 200) -> list:
    """The LLC of n_snapshots snapshots (chains x draws each, the config's other llc
    settings): llc_over_snapshots against devinterp's llc() called on each snapshot in
    turn, its chains one after another, on the same weights exported to TransformerLens.
    One run of each (devinterp's takes minutes), in wall and in process CPU seconds (on a
    shared machine the CPU seconds are the fairer comparison). Ours is warmed (on CPUs,
    compiled) on the first snapshot alone, then timed on all of them."""
    from icl_jax import export, llc, scores
    case = f"{_name(config)} LLC x{n_snapshots} snapshots, {chains}x{draws}"
    model, cfg = make_model(config.model), config.llc.copy_and_resolve_references()
    cfg.chains, cfg.draws = chains, draws
    trees = [init_params(model, jax.random.key(i)) for i in range(n_snapshots)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *trees)
    pool = data_lib.make_source(config).eval_set(cfg.examples, config.model.context + 1)
    t0 = time.perf_counter()  # on accelerators (vmap) this compiles a one-snapshot program
    jax.block_until_ready(llc.llc_over_snapshots(
        model, jax.tree.map(lambda a: a[:1], stacked), pool, cfg)["llc"])
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(llc.llc_over_snapshots(model, stacked, pool, cfg)["llc"])
    ours, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    how = (f"snapshots by {scores.default_stacking()}, chains "
           f"{'vmapped' if scores.default_stacking() == 'vmap' else 'one after another'}")
    rows = [_row(case, "ours, 1 snapshot, compile incl.", [first], "s"),
            _row(case, "ours", [ours], "s", how),
            _row(case, "ours, process CPU", [ours_cpu], "s", "all threads")]
    try:
        import datasets
        import torch
        from devinterp.slt.llc import llc as devinterp_llc
    except ImportError as e:
        return rows + [_note(case, "devinterp", f"skipped: {e}")]
    _set_torch_threads()

    def per_token_loss(net, ids):
        logits = net(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:],
                                                 reduction="none")

    walk = datasets.Dataset.from_dict({"input_ids": np.asarray(pool).tolist()})
    walk.set_format("torch")
    tls = [export.hooked_transformer(t, model.cfg) for t in trees]
    kwargs = dict(lr=cfg.eps, n_beta=llc.nbeta_of(cfg), localization=cfg.gamma,
                  num_chains=chains, num_draws=draws, batch_size=cfg.batch_size,
                  num_burnin_steps=cfg.burn_in, device="cpu", loss_fn=per_token_loss)
    if cfg.sampler == "rmsprop_sgld":
        kwargs.update(sampling_method="rmsprop_sgld", rmsprop_eps=cfg.rms_eps,
                      rmsprop_alpha=cfg.rms_alpha)
    t0, c0 = time.perf_counter(), time.process_time()
    for tl in tls:
        devinterp_llc(tl, walk, {}, **kwargs)
    theirs, theirs_cpu = time.perf_counter() - t0, time.process_time() - c0
    return rows + [
        _row(case, "devinterp loop", [theirs], "s", "HookedTransformers built before timing"),
        _row(case, "devinterp loop, process CPU", [theirs_cpu], "s",
             f"torch threads {torch.get_num_threads()}"),
        _row(case, "devinterp / ours", [theirs / ours], "x", "> 1: ours faster"),
        _row(case, "devinterp / ours, CPU", [theirs_cpu / ours_cpu], "x", "> 1: ours faster"),
    ]


# ----------------------------------------------------------------------------- driver

def run(suite: str = "default", configs=None, repeats: int = 5, json_path: str | None = None,
        torch_rows: bool = True, torch_threads: int | None = None, overrides=None,
        out=None, out_dir: str = "bench_accelerator", tiny: bool = False,
        with_reproduce: bool = False) -> dict:
    """Runs a suite, prints its table, writes JSON if asked; returns {"meta", "rows"}."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    if suite == "accelerator":  # its own configs and output (bench_accelerator)
        return bench_accelerator(out_dir, repeats, tiny, with_reproduce, out)
    TORCH_THREADS[0] = torch_threads
    out = out or sys.stdout
    specs = list(configs or [])
    train_configs = [load_config(s, overrides) for s in (specs or default_train())]
    small = load_config(specs[0] if specs else "small L2", overrides)
    meta = {"devices": [str(d) for d in jax.devices()], "platform": jax.devices()[0].platform,
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(), "repeats": repeats, "suite": suite,
            "command": " ".join(["icl-jax", "bench"] + sys.argv[2:]) if sys.argv[1:2] == ["bench"]
            else None}
    try:
        import torch
        meta["torch"] = torch.__version__
        meta["torch_threads"] = torch_threads or os.cpu_count()
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        meta["transformer_lens"] = version("transformer_lens")
    except Exception:  # noqa: BLE001
        pass
    rows = []
    parts = set(SUITES[1:]) - OPT_IN if suite == "default" else {suite}
    def emit(new):
        rows.extend(new)
        for r in new:
            print(format_row(r), file=out, flush=True)

    print(header(), file=out, flush=True)
    if "train" in parts:
        for c in train_configs:
            emit(bench_train(c, repeats, torch_rows))
    if "score" in parts:
        emit(bench_score(small, repeats))
    if "ensemble" in parts:
        emit(bench_ensemble(small, repeats))
    if "checkpoint" in parts:
        emit(bench_checkpoint(small, repeats))
    if "data" in parts:
        emit(bench_data(small, repeats))
    if "llc" in parts:
        emit(bench_llc(small))
    if "prefetch" in parts:
        for spec, steps in ([(s, {}) for s in specs] or DEFAULT_PREFETCH):
            emit(bench_prefetch(load_config(spec, {**steps, **(overrides or {})}), repeats))
    meta["loadavg_end"] = os.getloadavg()
    print(f"\n{meta['platform']} x{len(meta['devices'])}, {meta['cpu_count']} cores, jax "
          f"{meta['jax']}; load average {meta['loadavg_start'][0]:.2f} at start, "
          f"{meta['loadavg_end'][0]:.2f} at end; median of {repeats} repeats", file=out)
    result = {"meta": meta, "rows": rows}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def header():
    return (f"| {'case':30s} | {'metric':28s} | {'median':>12s} | {'IQR':>23s} | "
            f"{'min - max':>23s} | unit    | load | note\n|{'-' * 32}|{'-' * 30}|{'-' * 14}|"
            f"{'-' * 25}|{'-' * 25}|---------|------|-----")


def _fmt(x):
    if x is None:
        return ""
    a = abs(x)
    return f"{x:,.0f}" if a >= 1000 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.1 \
        else f"{x:.3g}"


def format_row(r):
    if r.get("median") is None:
        return (f"| {r['case']:30s} | {r['metric']:28s} | {'':>12s} | {'':>23s} | {'':>23s} | "
                f"{'':7s} | {r['load']:4.1f} | {r['note']}")
    iqr = f"{_fmt(r['p25'])} - {_fmt(r['p75'])}"
    mm = f"{_fmt(r['min'])} - {_fmt(r['max'])}"
    return (f"| {r['case']:30s} | {r['metric']:28s} | {_fmt(r['median']):>12s} | {iqr:>23s} | "
            f"{mm:>23s} | {r['unit']:7s} | {r['load']:4.1f} | {r['note']}")
