"""The bench's harness: timing (candidates interleaved repeat by repeat), rows and their
table, the preset sizes, a fixed batch, our compiled step, the data pipelines. The suites
(bench.py), their PyTorch peers (bench_torch.py) and the accelerator suite
(bench_accelerator.py) all build on it, and it imports none of them.
"""
from __future__ import annotations

import itertools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax import config as config_lib, data as data_lib, device_data, train
from icl_jax.model import make_model

SMALL = "small"  # the built-in config


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
    # the paper's shape in bf16 through the kernel model.attention=auto picks there
    # (cuDNN's fused attention on CUDA): the accelerator row
    "paper L2 bf16 T2048": ("layers=2", {"model.d_model": 768, "model.n_heads": 12,
                                         "model.context": 2048, "train.batch_size": 8,
                                         "model.dtype": "bfloat16"}),
}


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


def stats(x):
    x = np.asarray(x, np.float64)
    return {"median": float(np.median(x)), "p25": float(np.percentile(x, 25)),
            "p75": float(np.percentile(x, 75)), "min": float(x.min()), "max": float(x.max())}


def row(case, metric, values, unit, note="", scale=1.0):
    """A table row from per-repeat values (already in `unit` after `scale`)."""
    return {"case": case, "metric": metric, **stats(np.asarray(values) * scale), "unit": unit,
            "note": note, "load": os.getloadavg()[0]}


def note_row(case, metric, note):
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


def xla_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return None if not ca or "flops" not in ca else float(ca["flops"])


def load_config(spec: str, overrides: dict | None = None):
    """A validated config from 'file.py:arg' (or a PRESETS name) and field overrides."""
    if spec in PRESETS:
        arg, preset = PRESETS[spec]
        spec, overrides = f"{SMALL}:{arg}", {**preset, **(overrides or {})}
    return config_lib.load_validated(spec, overrides)


def shape_name(config):
    m, t = config.model, config.train
    return f"L{m.n_layers} d{m.d_model} H{m.n_heads} T{m.context} B{t.batch_size}"


def fixed_batch(config, k: int | None = None, step: int = 0):
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
        self.batch = jax.device_put(fixed_batch(config, ensemble),
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


def auto_pipeline(config) -> str:
    """The pipeline data.generate gives training on this platform."""
    use = device_data.use_device(config.data, jax.devices()[0].platform)
    return "device" if use else "host"


def header():
    return (f"| {'case':30s} | {'metric':28s} | {'median':>12s} | {'IQR':>23s} | "
            f"{'min - max':>23s} | unit    | load | note\n|{'-' * 32}|{'-' * 30}|{'-' * 14}|"
            f"{'-' * 25}|{'-' * 25}|---------|------|-----")


def fmt(x):
    if x is None:
        return ""
    a = abs(x)
    return f"{x:,.0f}" if a >= 1000 else f"{x:.1f}" if a >= 10 else f"{x:.2f}" if a >= 0.1 \
        else f"{x:.3g}"


def format_row(r):
    if r.get("median") is None:
        return (f"| {r['case']:30s} | {r['metric']:28s} | {'':>12s} | {'':>23s} | {'':>23s} | "
                f"{'':7s} | {r['load']:4.1f} | {r['note']}")
    iqr = f"{fmt(r['p25'])} - {fmt(r['p75'])}"
    mm = f"{fmt(r['min'])} - {fmt(r['max'])}"
    return (f"| {r['case']:30s} | {r['metric']:28s} | {fmt(r['median']):>12s} | {iqr:>23s} | "
            f"{mm:>23s} | {r['unit']:7s} | {r['load']:4.1f} | {r['note']}")
