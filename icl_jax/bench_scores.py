"""Times scoring snapshots in one vmapped jitted call against a Python loop of jitted calls.

python -m icl_jax.bench_scores WORKDIR [N]   (both compiled first; only the scoring is timed)
"""
from __future__ import annotations

import sys
import time

import jax

from icl_jax import analysis


def benchmark(workdir: str, n: int = 16, repeats: int = 3) -> dict:
    run = analysis._RunReader(workdir)
    e = run.config.eval
    inputs = run.inputs()
    steps = run.steps[-n:]
    trees = [run.params(s) for s in steps]
    stacked = analysis._stack(trees)
    key = (run.model_json, e.icl_early_index, e.icl_late_index, e.probe_tokens, "pattern")
    vmapped, single = analysis._scorer(*key, True), analysis._scorer(*key, False)
    jax.block_until_ready(vmapped(stacked, *inputs))
    jax.block_until_ready(single(trees[0], *inputs))
    t_vmap = t_loop = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(vmapped(stacked, *inputs))
        t_vmap = min(t_vmap, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for tree in trees:
            jax.block_until_ready(single(tree, *inputs))
        t_loop = min(t_loop, time.perf_counter() - t0)
    out = {"snapshots": len(trees), "vmapped_s": t_vmap, "loop_s": t_loop,
           "loop_over_vmapped": t_loop / t_vmap}
    print(f"{len(trees)} snapshots of {workdir} on {jax.devices()[0].platform}: vmapped "
          f"{t_vmap:.3f} s, loop {t_loop:.3f} s, loop / vmapped {t_loop / t_vmap:.2f}")
    return out


if __name__ == "__main__":
    benchmark(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16)
