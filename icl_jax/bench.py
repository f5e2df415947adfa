"""icl-jax bench: how fast training, scoring, ensembles, snapshots and data are here.

Every figure is measured in one process together with what it is compared against,
the candidates interleaved repeat by repeat so that a change in the machine's load
hits all of them alike. Each row reports the median over --repeats timed repeats
(after warm-up) and the spread (25th-75th percentile, min-max).

    icl-jax bench                                   # the default suite
    icl-jax bench --suite train --config small:layers=2 --json out.json

Model FLOPs are counted analytically (fwd+bwd = 3 x the forward's matmul FLOPs, the
attention's T x S products counted in full, as PaLM and nanoGPT count them) and
divided by the peak of a large matrix product timed in the same repeats (MFU).
The count of what our blocked causal attention actually executes is cross-checked
against XLA's cost analysis of the compiled step.

This file holds the driver and the suites' benchmarks; the timing, the rows and the
presets are in bench_harness.py, the PyTorch and TransformerLens peers they are timed
against in bench_torch.py, and the accelerator suite (its own sizes, targets and output
files) in bench_accelerator.py; those three never import this one.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax import config as config_lib, data as data_lib, train
from icl_jax import workdir as workdir_lib
from icl_jax.flops import train_flops
from icl_jax.model import QUERY_BLOCK, init_params, make_model
# PRESETS, xla_flops and train_flops are part of this module's face (tests, launch/)
from icl_jax.bench_harness import (PRESETS, JaxTrainer, auto_pipeline,  # noqa: F401
                                   data_pipelines, format_row, header, interleaved,
                                   load_config, matmul_peak_fn, note_row, row, shape_name,
                                   xla_flops)


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
# the prefetch suite's runs: the built-in text config (windows of a memory-mapped byte corpus)
# and the quick profile's synthetic data, each about a minute a run on 2 cores
DEFAULT_PREFETCH = (("text:layers=2", {"train.steps": 80}),
                    ("small L2", {"train.steps": 800}))


# ----------------------------------------------------------------------------- suites

def bench_train(config, repeats: int, torch_rows: bool = True) -> list:
    """Tokens/s and MFU of our step; PyTorch, torch.compile and TransformerLens beside it."""
    from icl_jax import bench_torch
    case, rows = shape_name(config), []
    m, t = config.model, config.train
    tokens = t.batch_size * m.context
    ours = JaxTrainer(config)
    peak_fn, peak_flops = matmul_peak_fn()
    flops = train_flops(m, t.batch_size, m.context)
    executed = train_flops(m, t.batch_size, m.context, "executed")
    xla = xla_flops(ours.compiled)  # of the per-device program of the data-parallel step
    xla = xla and xla * jax.device_count()
    fns = {"peak": peak_fn, "jax": ours}
    peers = bench_torch.torch_candidates(config, rows, case) if torch_rows else {}
    fns.update(peers)
    if peers and jax.devices()[0].platform == "cpu":
        fns["torch peak"] = bench_torch.torch_matmul_peak_fn()[0]
        attention, bmm_flops = bench_torch.attention_fns(m, t.batch_size)
        fns.update(attention)
    times = interleaved(fns, repeats)
    # The device's peak is the faster of the two libraries' products, repeat by repeat:
    # XLA:CPU's own GEMM and PyTorch's MKL differ by up to 20% on the same core.
    peak = peak_flops / times["peak"]
    rows.append(row(case, "matmul peak", peak, "GFLOP/s", "2048^3 float32 in the same repeats"
                    if jax.devices()[0].platform == "cpu" else "bf16 matmul", 1e-9))
    if "torch peak" in times:
        torch_peak = peak_flops / times["torch peak"]
        rows.append(row(case, "torch matmul peak", torch_peak, "GFLOP/s",
                        "the same product through PyTorch (MKL), same repeats", 1e-9))
        rows.append(row(case, "XLA / torch matmul", peak / torch_peak, "x",
                        "the two libraries' GEMM on the same product"))
        peak = np.maximum(peak, torch_peak)
    peak_note = "of the faster matmul peak" if "torch peak" in times else "of the matmul peak"
    rows.append(row(case, "jax train", tokens / times["jax"], "tok/s",
                    f"{times['jax'].min() * 1e3:.1f} ms/step at best"))
    rows.append(row(case, "jax MFU", flops / times["jax"] / peak, "%",
                    f"{flops / 1e9:.2f} GFLOP/step (full T x S), {peak_note}", 100))
    if xla:
        rows.append({**note_row(case, "FLOPs check", f"executed analytic {executed / 1e9:.3f} vs "
                                f"XLA cost analysis {xla / 1e9:.3f} GFLOP/step "
                                f"({100 * (xla / executed - 1):+.1f}%)"),
                     "analytic_executed": executed, "xla": xla, "analytic_full": flops})
    if "jax attention" in times and "torch eager" in times:
        ja, ta = times["jax attention"], times["torch attention"]
        rows.append(row(case, "attention fwd+bwd, jax", ja, "ms", "one layer's causal "
                        "attention core (model.causal_attention)", 1e3))
        rows.append(row(case, "attention fwd+bwd, torch", ta, "ms",
                        "scaled_dot_product_attention(is_causal=True), same inputs", 1e3))
        gap = times["jax"] - times["torch eager"]
        share = m.n_layers * (ja - ta) / gap
        rows.append(row(case, "attention share of gap", share, "%",
                        f"{m.n_layers} layers x (jax - torch attention) / (jax - torch eager "
                        "step); meaningful only when the step is slower", 100))
        K = m.d_head or m.d_model // m.n_heads
        q_rows = min(QUERY_BLOCK, m.context)
        shape = f"{t.batch_size * m.n_heads} x [{q_rows} x {K}] x [{K} x {m.context}]"
        rows.append(row(case, "batched matmul, jax", bmm_flops / times["jax bmm"], "GFLOP/s",
                        f"{shape}: the last query block's scores", 1e-9))
        rows.append(row(case, "batched matmul, torch.bmm", bmm_flops / times["torch bmm"],
                        "GFLOP/s", "the same product", 1e-9))
    for name in peers:
        rows.append(row(case, f"{name} train", tokens / times[name], "tok/s"))
        rows.append(row(case, f"{name} MFU", flops / times[name] / peak, "%",
                        f"same FLOPs, {peak_note}", 100))
        rows.append(row(case, f"jax / {name}", times[name] / times["jax"], "x",
                        "tokens/s ratio, per repeat"))
    return rows


def bench_score(config, repeats: int, n_snapshots: int = 16) -> list:
    """All snapshots scored in one call (vmapped, and lax.map) against a Python loop over them,
    and against a loop scoring each with TransformerLens hooks (tl_check.py)."""
    from icl_jax import analysis, bench_torch, scores
    case, rows = f"{shape_name(config)} x{n_snapshots} snapshots", []
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
    tl = bench_torch.tl_hooks_scorer(model, trees, inputs, key, rows, case)
    if tl is not None:
        fns["TL hooks"] = tl
    times = interleaved(fns, repeats, min_s=0)
    rows.append(row(case, "score vmapped", times["vmapped"], "s"))
    rows.append(row(case, "score lax.map", times["mapped"], "s"))
    rows.append(row(case, "score loop", times["loop"], "s"))
    rows.append(row(case, "loop / vmapped", times["loop"] / times["vmapped"], "x"))
    rows.append(row(case, "loop / lax.map", times["loop"] / times["mapped"], "x",
                    f"analyze uses {scores.default_stacking()} here"))
    if "TL hooks" in times:
        rows.append(row(case, "score TransformerLens hooks", times["TL hooks"], "s",
                        f"loop of tl_check.score_with_hooks over the {n_snapshots} snapshots; "
                        "HookedTransformers built before timing, only scoring timed"))
        rows.append(row(case, "TL hooks / lax.map", times["TL hooks"] / times["mapped"], "x",
                        "TransformerLens time over the lax.map call's, per repeat "
                        "(> 1: TransformerLens slower)"))
    return rows


def bench_ensemble(config, repeats: int, sizes=(4, 8)) -> list:
    """K members in one vmapped step against K sequential steps of one member."""
    case, rows = shape_name(config), []
    tokens = config.train.batch_size * config.model.context
    single = JaxTrainer(config)
    ens = {k: JaxTrainer(config, ensemble=k) for k in sizes}
    fns = {"single": single, **{f"K={k}": e for k, e in ens.items()}}
    times = interleaved(fns, repeats)
    for k in sizes:
        rows.append(row(case, f"ensemble K={k}", k * tokens / times[f"K={k}"], "tok/s"))
        rows.append(row(case, f"K={k} vmapped / sequential", k * times["single"] /
                        times[f"K={k}"], "x", "tokens/s ratio"))
    mem = {k: e.memory_bytes() for k, e in ens.items()}
    if all(mem.values()) and len(sizes) >= 2:
        k0, k1 = sizes[0], sizes[-1]
        per = (mem[k1] - mem[k0]) / (k1 - k0)
        base = mem[k0] - k0 * per
        avail = _available_memory()
        if per > 0 and avail:
            k_max = int((0.8 * avail - base) // per)
            rows.append(note_row(case, "largest ensemble", f"K <= {k_max:,} by the compiled step's "
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
    case, rows = shape_name(config), []
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
    rows.append(row(case, "step, no snapshots", times["no snapshots"] / every, "ms", scale=1e3))
    rows.append(row(case, "step, async snapshots", times["snapshots"] / every, "ms",
                    f"one every {every} steps", 1e3))
    n_snap = len(checkpoints.save_schedule(t.steps, ck.every, ck.log_spaced))
    overhead = (n_snap * per_save + tail) / (t.steps * times["no snapshots"] / every)
    rows.append(row(case, "snapshot overhead", overhead, "%",
                    f"{n_snap} snapshots in {t.steps} steps (default schedule); "
                    "difference of the two rows above", 100))
    share = n_snap * np.median(blocking) / (t.steps * np.median(times["no snapshots"]) / every)
    rows.append(row(case, "save() blocks the loop", np.asarray(blocking), "ms",
                    f"x {n_snap} snapshots = {100 * share:.2f}% of the run's step time", 1e3))
    return rows


def bench_data(config, repeats: int) -> list:
    """The data pipelines' tokens/s (numpy's on the host, device_data's on the device)
    against the training step's."""
    case, rows = shape_name(config), []
    t, m = config.train, config.model
    tokens = t.batch_size * m.context
    pipelines = data_pipelines(config)
    times = interleaved({**pipelines, "train": JaxTrainer(config)}, repeats)
    for name in pipelines:
        rows.append(row(case, f"data ({config.data.name}, {name})", tokens / times[name],
                        "tok/s"))
        rows.append(row(case, f"{name} / train", times["train"] / times[name], "x",
                        "how many times faster it makes tokens than training consumes them"))
    auto = auto_pipeline(config)
    rows.append(row(case, "data / train", times["train"] / times[auto], "x",
                    f"the pipeline data.generate={config.data.generate!r} trains on here: {auto}"))
    return rows


def bench_prefetch(config, repeats: int) -> list:
    """Whole runs of train_and_evaluate with the host batches made ahead in a thread
    (train.PREFETCH_BATCHES) against made before each step, interleaved run by run;
    tokens/s from each run's own log, its first and last logged spans left out (warm-up;
    the last one holds the final evaluation). Runs train.steps steps (100 when the config
    asks for more than 2,000)."""
    case, rows = f"{shape_name(config)} {config.data.name}", []
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
        rows.append(row(case, f"train, batches {name}", rates[name], "tok/s",
                        f"{steps} steps a run, log every {c.train.log_every}"))
    ratio = np.asarray(rates["prefetched"]) / np.asarray(rates["synchronous"])
    rows.append(row(case, "prefetched / synchronous", ratio, "x", "tokens/s ratio, per repeat"))
    source, t = data_lib.make_source(c), c.train
    step = [0]

    def batch():
        step[0] += 1
        source.batch(step[0], t.batch_size, c.model.context + 1)

    data_s = interleaved({"data": batch}, repeats)["data"]
    rows.append(row(case, f"data ({c.data.name}) alone", t.batch_size * c.model.context
                    / data_s, "tok/s", "source.batch of the whole batch, on the host"))
    return rows


def bench_llc(config, n_snapshots: int = 16, chains: int = 8, draws: int = 200) -> list:
    """The LLC of n_snapshots snapshots (chains x draws each, the config's other llc
    settings): llc_over_snapshots against devinterp's llc() called on each snapshot in
    turn, its chains one after another, on the same weights exported to TransformerLens.
    One run of each (devinterp's takes minutes), in wall and in process CPU seconds (on a
    shared machine the CPU seconds are the fairer comparison). Ours is warmed (on CPUs,
    compiled) on the first snapshot alone, then timed on all of them."""
    from icl_jax import bench_torch, export, llc, scores
    case = f"{shape_name(config)} LLC x{n_snapshots} snapshots, {chains}x{draws}"
    model, cfg = make_model(config.model), config.llc.copy_and_resolve_references()
    cfg.chains, cfg.draws = chains, draws
    trees = [init_params(model, jax.random.key(i)) for i in range(n_snapshots)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *trees)
    pool = llc.held_out_pool(data_lib.make_source(config), config)
    t0 = time.perf_counter()  # on accelerators (vmap) this compiles a one-snapshot program
    jax.block_until_ready(llc.llc_over_snapshots(
        model, jax.tree.map(lambda a: a[:1], stacked), pool, cfg)["llc"])
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(llc.llc_over_snapshots(model, stacked, pool, cfg)["llc"])
    ours, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    how = (f"snapshots by {scores.default_stacking()}, chains "
           f"{'vmapped' if scores.default_stacking() == 'vmap' else 'one after another'}")
    rows = [row(case, "ours, 1 snapshot, compile incl.", [first], "s"),
            row(case, "ours", [ours], "s", how),
            row(case, "ours, process CPU", [ours_cpu], "s", "all threads")]
    rows += bench_head_llc(config, model, trees[:2], pool, cfg)
    try:
        import datasets
        import torch
        from devinterp.slt.llc import llc as devinterp_llc
    except ImportError as e:
        return rows + [note_row(case, "devinterp", f"skipped: {e}")]
    bench_torch.set_torch_threads()

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
        row(case, "devinterp loop", [theirs], "s", "HookedTransformers built before timing"),
        row(case, "devinterp loop, process CPU", [theirs_cpu], "s",
            f"torch threads {torch.get_num_threads()}"),
        row(case, "devinterp / ours", [theirs / ours], "x", "> 1: ours faster"),
        row(case, "devinterp / ours, CPU", [theirs_cpu / ours_cpu], "x", "> 1: ours faster"),
    ]


def bench_head_llc(config, model, trees, pool, cfg) -> list:
    """Every head's wrLLC (head_llc.heads_over_snapshots, the same chains x draws) of a few
    snapshots: seconds per snapshot per head, after a warm-up (on CPUs, the compile) on the
    first snapshot alone; its cost against the whole model's is what sizes the per-head
    view's defaults (head_llc.REPRODUCE_VIEW)."""
    from icl_jax import head_llc
    heads = config.model.n_layers * config.model.n_heads
    case = f"{shape_name(config)} head LLC x{len(trees)} snapshots, {cfg.chains}x{cfg.draws}"
    t0 = time.perf_counter()
    jax.block_until_ready(head_llc.heads_over_snapshots(model, trees[:1], {"all": pool},
                                                        cfg)["llc"])
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(head_llc.heads_over_snapshots(model, trees, {"all": pool}, cfg)["llc"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return [row(case, "ours, 1 snapshot, compile incl.", [first], "s", f"{heads} heads"),
            row(case, "ours, per snapshot per head", [wall / len(trees) / heads], "s",
                f"{heads} heads a snapshot, one program"),
            row(case, "ours, per snapshot per head, CPU", [cpu / len(trees) / heads], "s",
                "process CPU, all threads")]


# ----------------------------------------------------------------------------- driver

def run(suite: str = "default", configs=None, repeats: int = 5, json_path: str | None = None,
        torch_rows: bool = True, torch_threads: int | None = None, overrides=None,
        out=None, out_dir: str = "bench_accelerator", tiny: bool = False,
        with_reproduce: bool = False) -> dict:
    """Runs a suite, prints its table, writes JSON if asked; returns {"meta", "rows"}."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid: {', '.join(SUITES)}")
    # the suites' modules import this one's helpers, so they are imported here, not above
    from icl_jax import bench_accelerator, bench_torch
    if suite == "accelerator":  # its own configs and output (bench_accelerator.py)
        return bench_accelerator.bench_accelerator(out_dir, repeats, tiny, with_reproduce, out)
    bench_torch.TORCH_THREADS[0] = torch_threads
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
