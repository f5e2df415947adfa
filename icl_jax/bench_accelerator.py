"""icl-jax bench --suite accelerator: the paper's shape and the quick profile on one accelerator.

Tokens/s and MFU of the paper's shape in bf16, ensembles of the quick model in one
program, scoring stacked snapshots, the data pipelines against the step, and (with
--reproduce) the whole quick reproduction; the rows with an H100/H200 target say whether
they meet it. Writes accelerator.json and accelerator.md. Timing, rows and configs come
from bench.py; --tiny shrinks everything so that a CPU test runs the suite in seconds.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax import data as data_lib
from icl_jax.bench_harness import (JaxTrainer, auto_pipeline, data_pipelines, fmt,
                                   interleaved, load_config, matmul_peak_fn, row, shape_name)
from icl_jax.flops import train_flops
from icl_jax.model import init_params, make_model

PAPER = "paper"  # the built-in config
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
    case = f"paper {shape_name(paper)} {m.dtype}"
    tokens = t.batch_size * m.context
    rows.append(row(case, "matmul peak", peak_flops / times["peak"], "TFLOP/s",
                    f"{'bfloat16' if jax.default_backend() != 'cpu' else 'float32'} "
                    "square product, same repeats", 1e-12))
    paper_tok_s = tokens / times["paper"]
    rows.append(row(case, "paper train", paper_tok_s, "tok/s",
                    f"attention: {paper_step.model.kernel}"))
    rows.append(row(case, "paper MFU", train_flops(m, t.batch_size, m.context) / times["paper"]
                    / (peak_flops / times["peak"]), "%", "full T x S FLOPs over the peak", 100))

    # (2) ensembles of the quick model in one program against one member
    sizes = (2, 4) if tiny else (4, 16, 64)
    one = JaxTrainer(quick)
    ensembles = {k: JaxTrainer(quick, ensemble=k) for k in sizes}
    times = interleaved({"one": one, **{f"K={k}": e for k, e in ensembles.items()}}, repeats)
    case, tokens = f"quick {shape_name(quick)}", quick.train.batch_size * quick.model.context
    rows.append(row(case, "one member train", tokens / times["one"], "tok/s"))
    for k in sizes:
        rows.append(row(case, f"K={k} summed", k * tokens / times[f"K={k}"], "tok/s"))
        rows.append(row(case, f"K={k} summed / one", k * times["one"] / times[f"K={k}"], "x",
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
    rows.append(row(case, "score vmapped", times["vmapped"], "s"))
    rows.append(row(case, "score loop", times["loop"], "s"))
    rows.append(row(case, "vmapped / loop", times["loop"] / times["vmapped"], "x",
                    "loop time over vmapped time, per repeat"))

    # (4) the data pipelines against the step, both profiles: tokens/s against tokens/s;
    # "data" is the pipeline training uses here (data.generate), the others are beside it
    for name, config, step_tok_s in (("quick", quick, tokens / quick_step_s),
                                     ("paper", paper_data, paper_tok_s)):
        with tempfile.TemporaryDirectory(prefix="icl_jax_bench_") as tmp:
            pipelines = data_pipelines(config, tmp)  # text: the tokenizer is built here
        b = config.train.batch_size
        times = interleaved(pipelines, repeats)
        auto = auto_pipeline(config)
        case = f"{name} {shape_name(config)} {config.data.name}"
        rows.append(row(case, "step", step_tok_s, "tok/s", "from the rows above"))
        for pipe in sorted(pipelines, key=lambda p: p != auto):
            data_tok_s = b * config.model.context / times[pipe]
            label = "data" if pipe == auto else f"{pipe} data"
            rows.append(row(case, label, data_tok_s, "tok/s", f"made on the {pipe}"))
            rows.append(row(case, f"{label} / step", data_tok_s / np.median(step_tok_s), "x",
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
            subprocess.run(cmd, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
            rows.append(row("quick reproduction", "reproduce --profile quick",
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
        lines.append(f"| {r['case']} | {r['metric']} | {fmt(r['median'])} | {fmt(r['p25'])} - "
                     f"{fmt(r['p75'])} | {r['unit']} | {r.get('target', '')} | {met} | "
                     f"{r['note']} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "accelerator.md"), "w") as f:
        f.write(table)
    print(table, file=out, flush=True)
    return result
