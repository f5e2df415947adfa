"""From snapshots to numbers: scores of every snapshot, the phase change, the PCA.

analyze(["runs/2l", "runs/1l"]) opens every run once, scores each snapshot
(scores.snapshot_scores, one jitted call per chunk of snapshots, vmapped or mapped),
finds the phase change, fits one PCA over all runs and writes scores.json and pca.json;
report.py then draws the figures and report.html from what it returns. The pure pieces
(detect_phase_change, fit_pca, trajectory_turn, induction_heads) are usable on their own.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import time

import jax
import numpy as np

from icl_jax import checkpoints, data as data_lib, scores, workdir as workdir_lib
from icl_jax.model import make_model


# ----------------------------------------------------------------------------- phase change

def gaussian_smooth(y, sigma_points):
    """y convolved with a Gaussian of `sigma_points` samples, its ends padded with their values."""
    if sigma_points <= 0:
        return y
    r = int(math.ceil(4 * sigma_points))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_points) ** 2)
    k /= k.sum()
    padded = np.pad(y, r, mode="edge")
    return np.convolve(padded, k, mode="valid")


def _spread_by_smoothing(frac: float) -> float:
    """Width, in units of the smoothing's sigma, of the window (rate > frac x peak) that
    smoothing alone gives an instantaneous step: the Gaussian above frac of its peak."""
    return 2 * math.sqrt(2 * math.log(1 / frac))


def paired_standard_error(x, icl_by_example, xa: float, xb: float) -> float:
    """Standard error of the change of the ICL score between xa and xb, where every snapshot
    is scored on the same evaluation examples: each example's score (icl_by_example [S, B],
    snapshots at the increasing positions x [S]) interpolated linearly at both points, the
    sample standard deviation of the B differences over sqrt(B). The noise the examples
    share (which sequences are hard) cancels in the difference, so this is far smaller than
    the two snapshots' own standard errors in quadrature."""
    E = np.asarray(icl_by_example, np.float64)
    x = np.asarray(x, np.float64)
    if E.ndim != 2 or E.shape[0] != len(x) or E.shape[1] < 2:
        raise ValueError(f"icl_by_example must be [snapshots={len(x)}, examples>=2], "
                         f"got shape {E.shape}")

    def at(v):
        i = int(np.clip(np.searchsorted(x, v), 1, len(x) - 1))
        w = float(np.clip((v - x[i - 1]) / (x[i] - x[i - 1]), 0.0, 1.0))
        return (1 - w) * E[i - 1] + w * E[i]

    d = at(xb) - at(xa)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def detect_phase_change(steps, icl, tokens=None, *, icl_se=None, icl_by_example=None,
                        axis: str = "log",
                        smooth: float = 0.05, frac: float = 0.3, min_drop: float = 0.1,
                        noise_factor: float = 3.0, min_share: float = 0.4,
                        max_width: float = 1.0, grid: int = 512) -> dict:
    """The training window in which the ICL score drops abruptly, by a stated rule.

    Rule:
      1. x = ln(step) (axis "log"; step 0 is left out) or step (axis "linear").
      2. Interpolate the ICL score linearly onto `grid` even points in x and smooth it
         with a Gaussian of standard deviation `smooth` (in x units; for axis
         "linear" a fraction of the step range).
      3. rate = -d(ICL)/dx. Every local maximum of rate is a candidate, steepest first;
         a candidate's window is the contiguous span around it where rate > frac x its
         rate.
      4. The drop threshold of a window is max(min_drop, noise_factor x se), se the
         standard error of the score's change across the window from two sources, in
         quadrature. The evaluation set's: paired when each example's score is given
         (`icl_by_example` [snapshots, examples]; every snapshot is scored on the same
         examples, so their shared noise cancels: paired_standard_error), else from the
         snapshots' own standard errors (`icl_se`, interpolated at the edges) as
         sqrt(se_start^2 + se_end^2), else 0. And training's: the model wobbles from one
         snapshot to the next with SGD's noise, which no evaluation set removes; its
         size is a robust spread of the raw score's snapshot-to-snapshot changes (1.4826
         x their median absolute deviation, over sqrt(2): `wobble`), and a difference
         of two snapshots carries sqrt(2) x it. A drop either noise could make does not
         count.
      5. A candidate is the phase change if: its drop (smoothed score at the start minus
         at the end) is at least the threshold, and at least `min_share` of the smoothed
         curve's fall around it (from its highest point within max_width before the
         window's start to its lowest point within max_width after its end); its
         width, less the spread smoothing alone gives a step (in quadrature: 3.1 x smooth
         at frac 0.3), is at most `max_width` in x (log axis: 1.0 = a factor e of steps;
         a smooth, slowly improving curve is spread wider); it ends before the last
         snapshot (the score has settled again); and it is not the early transient, in
         which the score rises while the model learns the background statistics and falls
         back: a window whose fall begins at the top of the rise (the smoothed score falls
         all the way from its highest point before the window's end into the window, and
         the window starts within max_width of that point) must
         end below the lowest score before that top (initialisation included) by at least
         the drop threshold: the part of such a fall that only undoes the rise is not
         in-context learning, and what is left must stand out of the noise.
      6. The first candidate that passes is reported; if none does, the steepest one's
         window is, with `reason` naming the condition it failed.
    Returns {detected, reason, start_step, end_step, peak_step, start_tokens,
    end_tokens, icl_before, icl_after, drop, drop_threshold, se_before, se_after, se_drop
    (the window's noise, both sources), wobble (training's, one snapshot),
    icl_first, candidates, rule}; steps are those of the window's edges in the smoothed
    curve, ICL before/after the smoothed values there.
    """
    steps = np.asarray(steps, np.float64)
    icl = np.asarray(icl, np.float64)
    se = (np.zeros_like(icl) if icl_se is None else
          np.nan_to_num(np.asarray(icl_se, np.float64), nan=0.0))
    if se.shape != icl.shape:
        raise ValueError(f"icl_se has {se.shape} entries but icl has {icl.shape}")
    by_ex = None if icl_by_example is None else np.asarray(icl_by_example, np.float64)
    if by_ex is not None and (by_ex.ndim != 2 or by_ex.shape[0] != len(icl)):
        raise ValueError(f"icl_by_example must be [{len(icl)} snapshots, examples], "
                         f"got shape {by_ex.shape}")
    order = np.argsort(steps)
    steps, icl, se = steps[order], icl[order], se[order]
    finite = np.isfinite(icl)
    steps, icl, se = steps[finite], icl[finite], se[finite]
    if by_ex is not None:
        by_ex = by_ex[order][finite]
    out = {"detected": False, "reason": "", "rule": {
        "axis": axis, "smooth": smooth, "frac": frac, "min_drop": min_drop,
        "noise_factor": noise_factor, "min_share": min_share, "max_width": max_width,
        "standard_error": "paired" if by_ex is not None else
                          "unpaired" if icl_se is not None else "none"},
        "start_step": None, "end_step": None, "peak_step": None, "start_tokens": None,
        "end_tokens": None, "icl_before": None, "icl_after": None, "drop": None,
        "drop_threshold": None, "se_before": None, "se_after": None, "se_drop": None,
        "wobble": None,
        "icl_first": float(icl[0]) if len(icl) else None, "candidates": 0}
    if len(steps) == 0:
        out["reason"] = "no finite ICL score"
        return out
    first_icl = float(icl[0])  # initialisation: step 0 counts here
    keep = (steps > 0) if axis == "log" else np.ones_like(steps, bool)
    steps, icl, se = steps[keep], icl[keep], se[keep]
    if by_ex is not None:
        by_ex = by_ex[keep]
    if len(steps) < 4:
        out["reason"] = f"too few snapshots ({len(steps)}) to find a phase change"
        return out
    x = np.log(steps) if axis == "log" else steps
    changes = np.diff(icl)
    wobble = (1.4826 * float(np.median(np.abs(changes - np.median(changes)))) / math.sqrt(2)
              if len(changes) >= 4 else 0.0)
    out["wobble"] = wobble
    xg = np.linspace(x[0], x[-1], grid)
    dx = xg[1] - xg[0]
    sigma = smooth if axis == "log" else smooth * (x[-1] - x[0])
    yg = gaussian_smooth(np.interp(xg, x, icl), sigma / dx)
    seg = np.interp(xg, x, se)
    rate = -np.gradient(yg, dx)
    inner = np.r_[rate[0] > rate[1], (rate[1:-1] >= rate[:-2]) & (rate[1:-1] > rate[2:]),
                  rate[-1] > rate[-2]]
    peaks = [int(i) for i in np.nonzero(inner & (rate > 0))[0]]
    peaks.sort(key=lambda i: -rate[i])
    out["candidates"] = len(peaks)
    if not peaks:
        out["reason"] = "the ICL score never decreases"
        return out
    to_step = (lambda v: float(np.exp(v))) if axis == "log" else float
    spread = _spread_by_smoothing(frac) * sigma

    def from_top(a, top):
        """Does the window's fall begin at the top of the score's rise (`top`: the smoothed
        score's highest point before the window's end), the score falling all the way from
        it into the window, which starts within max_width of it (a rise and a fall in one
        bump, with no plateau between; a heavily smoothed plateau can fall all the way
        too, but it is longer)?"""
        return (top <= a and xg[a] - xg[top] <= max_width
                and bool(np.all(rate[top + 1:a + 1] > 0)))

    def judge(p):
        above = rate > frac * rate[p]
        a = p
        while a > 0 and above[a - 1]:
            a -= 1
        b = p
        while b < grid - 1 and above[b + 1]:
            b += 1
        drop = float(yg[a] - yg[b])
        evaluation = (paired_standard_error(x, by_ex, xg[a], xg[b]) if by_ex is not None
                      else math.hypot(seg[a], seg[b]))
        noise = math.hypot(evaluation, math.sqrt(2) * wobble)
        threshold = max(min_drop, noise_factor * noise)
        top = int(np.argmax(yg[:b + 1]))
        floor = min(first_icl, float(yg[:top + 1].min()))  # lowest before the rise's top
        below_floor = floor - float(yg[b])
        # the fall around the window: from the highest point within max_width before it to
        # the lowest within max_width after it (an earlier transient's peak stays out)
        before = (xg <= xg[a]) & (xg >= xg[a] - max_width)
        after = (xg >= xg[b]) & (xg <= xg[b] + max_width)
        total = float(yg[before].max() - yg[after].min())
        width = float(xg[b] - xg[a])
        net_width = math.sqrt(max(width ** 2 - spread ** 2, 0.0))
        w = dict(start_step=round(to_step(xg[a])), end_step=round(to_step(xg[b])),
                 peak_step=round(to_step(xg[p])), icl_before=float(yg[a]),
                 icl_after=float(yg[b]), drop=drop, drop_threshold=threshold,
                 se_before=float(seg[a]), se_after=float(seg[b]), se_drop=float(noise))
        if drop < threshold:
            why = (f"the drop is only {drop:.3f} nats (< {threshold:.3f} = max({min_drop}, "
                   f"{noise_factor} x the standard error of the change, {noise:.3f}))")
        elif drop < min_share * total:
            why = (f"the drop ({drop:.3f}) is under {min_share:.0%} of the score's fall "
                   f"around it ({total:.3f}): a steep part of a gradual decline")
        elif net_width > max_width:
            why = (f"the drop is spread over {width:.2f} {axis}-step units ({net_width:.2f} "
                   f"less the smoothing's own spread; > {max_width}): gradual, not abrupt")
        elif b == grid - 1:
            why = "the score is still falling at the last snapshot"
        elif from_top(a, top) and below_floor < threshold:
            why = (f"the score falls from the top of its first rise and ends ({yg[b]:+.3f}) "
                   f"only {below_floor:.3f} below its lowest value before that rise "
                   f"({floor:+.3f}; needs the drop threshold, {threshold:.3f}): the early "
                   "transient, not in-context learning")
        else:
            why = ""
        return w, why

    steepest = None
    for p in peaks:
        w, why = judge(p)
        steepest = steepest or (w, why)
        if not why:
            out.update(w, detected=True, reason="abrupt drop")
            break
    else:
        out.update(steepest[0], reason=steepest[1])
    if tokens is not None and out["start_step"] is not None:
        tokens = np.asarray(tokens, np.float64)[order][finite][keep]
        per_step = tokens[-1] / steps[-1] if steps[-1] else 0.0
        out.update(start_tokens=round(out["start_step"] * per_step),
                   end_tokens=round(out["end_step"] * per_step))
    return out


# ----------------------------------------------------------------------------- PCA

def fit_pca(vectors_NX, n_components: int = 2) -> dict:
    """PCA by numpy SVD of mean-centred rows: {"mean", "components" [C, X], "explained", "project"}."""
    X = np.asarray(vectors_NX, np.float64)
    mean = X.mean(0)
    _, s, vt = np.linalg.svd(X - mean, full_matrices=False)
    var = s ** 2
    explained = var / max(var.sum(), 1e-30)
    comps = vt[:n_components]
    return {"mean": mean, "components": comps, "explained": explained[:n_components],
            "project": (X - mean) @ comps.T}


def trajectory_turn(points_N2, steps, phase_change: dict) -> dict:
    """How the PCA trajectory turns at the phase change.

    turn_deg: the angle between the trajectory's path before the window (from the
    first snapshot to the window's start) and its path through the window (start
    to end), in degrees: 0 keeps going the same way, 90 or more is a sharp turn.
    fastest_step: the snapshot where the trajectory moves fastest per unit of
    ln(step). turn_deg is None without a detected window.
    """
    P, steps = np.asarray(points_N2, np.float64), np.asarray(steps, np.float64)
    out = {"turn_deg": None, "fastest_step": None}
    if len(P) >= 2:
        lns = np.log(np.maximum(steps, 1))
        speed = np.linalg.norm(np.diff(P, axis=0), axis=1) / np.maximum(np.diff(lns), 1e-9)
        out["fastest_step"] = int(steps[1:][int(np.argmax(speed))])
    if not phase_change.get("detected"):
        return out
    near = lambda s: int(np.argmin(np.abs(np.log(np.maximum(steps, 1)) - np.log(max(s, 1)))))
    start, end = phase_change["start_step"], phase_change["end_step"]
    u = P[near(start)] - P[0]
    v = P[near(end)] - P[near(start)]
    if np.linalg.norm(u) > 1e-12 and np.linalg.norm(v) > 1e-12:
        cos = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        out["turn_deg"] = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    return out


# ----------------------------------------------------------------------------- induction heads

def induction_heads(prefix_matching_LH, copying_LH, prefix_threshold: float,
                    copying_threshold: float) -> list[list[int]]:
    """[[layer, head], ...] of the heads above both thresholds (one snapshot's scores)."""
    pm, cp = np.asarray(prefix_matching_LH), np.asarray(copying_LH)
    return [[int(l), int(h)] for l, h in zip(*np.nonzero((pm > prefix_threshold)
                                                         & (cp > copying_threshold)))]


# ----------------------------------------------------------------------------- scoring

def scorer(model, early: int, late: int, n_tokens: int, ablation: str = "pattern",
           stacking: str | None = None):
    """scores.snapshot_scores jitted: fn(params, inputs) for one snapshot (stacking None), or
    fn(stacked params, inputs) for snapshots stacked on a leading axis (stacking "vmap":
    jax.vmap; "map": jax.lax.map). Cached by architecture, so analysing several runs of one
    shape compiles once."""
    if stacking is not None and stacking not in scores.STACKING:
        raise ValueError(f"stacking must be one of {scores.STACKING} or None, got {stacking!r}")
    return _scorer(json.dumps(model.cfg, sort_keys=True), early, late, n_tokens, ablation,
                   stacking)


@functools.lru_cache(maxsize=8)
def _scorer(model_json: str, early, late, n_tokens, ablation, stacking):
    model = make_model(json.loads(model_json))

    def one(params, inputs):
        return scores.snapshot_scores(model, params, inputs, early, late, n_tokens, ablation)

    if stacking == "vmap":
        program = jax.jit(jax.vmap(one, in_axes=(0, None)))
    elif stacking == "map":
        program = jax.jit(lambda stacked, inputs: jax.lax.map(lambda p: one(p, inputs), stacked))
    else:
        program = jax.jit(one)

    def score(params, inputs):
        out = dict(program(params, inputs))
        out["copying"] = scores.copying_from_ov_products(jax.device_get(out.pop("ov_products")))
        return out

    score.program = program  # the compiled part, for lowering and benchmarks
    return score


@dataclasses.dataclass
class LastSnapshot:
    """What the figures and the claims need of a run's last scored snapshot, kept from the
    scoring so that nothing restores it again: the run (config, model, workdir), the step,
    its params, the evaluation inputs and the attention on the first probe sequence."""
    run: checkpoints.Run
    step: int
    params: dict
    inputs: dict
    probe_attention_LHTS: np.ndarray


def open_run(workdir: str, measure: dict | None = None) -> checkpoints.Run:
    """The run in `workdir`; FileNotFoundError naming it if it holds no run or no snapshot.
    measure: overrides of its eval and llc fields ({"eval.n_examples": 1024}) to measure it
    with (config.MEASUREMENT; ConfigError for any other field)."""
    from icl_jax import config as config_lib
    measure = config_lib.measurement_overrides(measure)
    run = checkpoints.Run(workdir)
    if not run.steps:
        raise FileNotFoundError(f"{workdir!r} has no snapshots yet")
    if measure:
        run.config = config_lib.with_overrides(run.config, measure)
    return run


def _stack(trees):
    return jax.tree.map(lambda *a: np.stack(a), *trees)


def snapshot_bytes(config) -> int:
    """A generous estimate of the device memory scoring one snapshot takes in a vmapped chunk:
    three float32 copies of the evaluation set's logits (logits, log-softmax, the ablation's
    second run) and two of its attention patterns. At Hoogland et al.'s text shape (512
    examples x 1024 tokens x 5,000 tokens of vocabulary) that is ~34 GB: a chunk of 16 is
    more than a GPU holds."""
    m, e = config.model, config.eval
    logits = e.n_examples * m.context * m.vocab_size * 4
    attention = e.n_examples * m.n_layers * m.n_heads * m.context ** 2 * 4
    return 3 * logits + 2 * attention


def device_memory() -> int | None:
    """Bytes the default device's allocator may hold; None where it does not say (CPUs)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends do not implement memory_stats
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def fitting_chunk(chunk: int, config, stacking: str, memory: int | None) -> int:
    """`chunk`, or fewer snapshots if a vmapped chunk would take more than half of `memory`
    (lax.map holds one snapshot's intermediates at a time, and a device that does not say
    what it holds is not second-guessed)."""
    if stacking != "vmap" or not memory:
        return chunk
    return max(1, min(chunk, int(memory // 2 // snapshot_bytes(config))))


def _out_of_memory(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def score_run(run: checkpoints.Run, chunk: int = 16, ablation: str = "pattern",
              progress: bool = True, stacking: str | None = None, llc: bool = False,
              llc_heads=None):
    """(per-snapshot scores as numpy arrays [N, ...], LastSnapshot) of every snapshot of a run.

    Snapshots are restored `chunk` at a time, stacked on a leading axis and scored in
    one jitted call (vmapped, or mapped on CPU: see scores.default_stacking); the last chunk is
    padded to `chunk` (by repeating its last snapshot) so that every call has the same
    shape and nothing recompiles. Fewer snapshots go in a call where `chunk` would not fit in
    the device's memory (fitting_chunk; and half as many each time it runs out). A snapshot
    that cannot be restored is skipped, warned of.
    llc: also the local learning coefficient of each chunk (llc.llc_over_snapshots, the
    run's `llc` config section, batches from its held-out data), under the keys llc,
    llc_std, llc_loss_trace [N, chain, draw], and llc_diverged / llc_messages.
    llc_heads: a head_llc.HeadView: also every head's refined LLC, under the key llc_heads
    (head_llc.Recorder.record).
    """
    e, name = run.config.eval, run.workdir
    source = data_lib.make_source(run.config, run.workdir)
    inputs = scores.evaluation_inputs(run.config, source)
    stacking = stacking or scores.default_stacking()
    score = scorer(run.model, e.icl_early_index, e.icl_late_index, e.probe_tokens, ablation,
                   stacking)
    size = fitting_chunk(chunk, run.config, stacking, device_memory())  # snapshots a call
    if size < chunk and progress:
        print(f"scoring {name}: {size} snapshots a call, not {chunk}: a chunk of {chunk} would "
              f"not fit in the device's memory", file=sys.stderr)
    steps, results, t0 = run.steps, [], time.perf_counter()
    good, last, llcs = [], None, []
    if llc:
        from icl_jax import llc as llc_lib
        llc_pool = llc_lib.held_out_pool(source, run.config)
    if llc_heads:
        from icl_jax import head_llc
        heads = head_llc.Recorder(run, source, llc_heads, stacking, chunk)

    def scored(trees):
        """Scores `trees` in calls of `size` snapshots (the last padded by repeating its last
        snapshot, so that nothing recompiles), halving `size` each time the device runs out
        of memory; appends to results; the last snapshot's probe attention and index."""
        nonlocal size
        n = len(trees)
        try:
            out = score(_stack(trees + [trees[-1]] * (size - n)), inputs)
        except jax.errors.JaxRuntimeError as err:
            if not _out_of_memory(err) or size == 1:
                raise
            size //= 2
            print(f"warning: scoring {name}: out of device memory; {size} snapshots a call "
                  f"from now on (--chunk {size} skips this)", file=sys.stderr)
            i = 0
            while i < n:  # `size` may shrink again inside: the piece's end is taken first
                j = i + size
                tail, i = scored(trees[i:j]), j
            return tail
        attention = out.pop("probe_attention")  # only the last snapshot's leaves the device
        results.append(jax.tree.map(lambda a: a[:n], jax.device_get(out)))
        return attention, n - 1

    def score_chunk(trees):
        nonlocal last
        n = len(trees)
        if llc:
            llcs.append(llc_lib.llc_over_snapshots(
                run.model, trees, llc_pool, run.config.llc, steps=good[len(good) - n:],
                seed=run.config.seed, stacking=stacking, chunk=chunk))
        if llc_heads:
            heads.add(trees, good[len(good) - n:])
        last = (trees[-1], *scored(trees))
        if progress:
            print(f"scoring {name}: {len(good)}/{len(steps)} snapshots "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    trees = []
    for step in steps:
        try:
            tree = run.params(step)
        except Exception as e:  # a damaged snapshot costs itself, not the analysis
            print(f"warning: skipping snapshot {step} of {name}: it cannot be restored "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:160]})", file=sys.stderr)
            continue
        good.append(step)
        trees.append(tree)
        if len(trees) == chunk:
            score_chunk(trees)
            trees = []
    if trees:
        score_chunk(trees)
    if not good:
        raise FileNotFoundError(f"no snapshot of {name!r} can be restored")
    per = jax.tree.map(lambda *a: np.concatenate(a), *results)
    if llc:
        for key, out_key in (("llc", "llc"), ("llc_std", "llc_std"),
                             ("loss_trace", "llc_loss_trace")):
            per[out_key] = np.concatenate([c[key] for c in llcs])
        per["llc_diverged"] = [d for c in llcs for d in c["diverged"]]
        per["llc_messages"] = [m for c in llcs for m in c["messages"]]
        for m in per["llc_messages"]:
            print(f"warning: {name}: {m}", file=sys.stderr)
    if llc_heads:
        per["llc_heads"] = heads.record()
        for m in per["llc_heads"]["messages"]:
            print(f"warning: {name}: {m}", file=sys.stderr)
    per["steps"] = np.asarray(good)
    per["tokens"] = per["steps"] * (run.config.train.batch_size * run.config.model.context)
    params, attention, i = last
    return per, LastSnapshot(run, good[-1], params, inputs, np.asarray(attention[i]))


# ----------------------------------------------------------------------------- analyze

def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _run_names(workdirs):
    names = []
    for w in workdirs:
        base = os.path.basename(os.path.normpath(w)) or "run"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def phase_change_of(scores: dict) -> dict:
    """detect_phase_change on a run's scores (as score_run returns them or scores.json holds
    them): the one place the rule is fed, for fresh analyses and saved ones alike."""
    return detect_phase_change(scores["steps"], scores["icl_score"], scores["tokens"],
                               icl_se=scores.get("icl_se"),
                               icl_by_example=scores.get("icl_by_example"))


def _record(name, run, s, ablation) -> dict:
    """What scores.json holds for one run."""
    e = run.config.eval
    return {
        "name": name, "workdir": workdir_lib.absolute(run.workdir),
        "icl_indices": {"early": e.icl_early_index, "late": e.icl_late_index},
        "ablation_kind": ablation,
        "thresholds": {"prefix_matching": e.induction_prefix_threshold,
                       "copying": e.induction_copying_threshold},
        "steps": s["steps"], "tokens": s["tokens"], "icl_score": s["icl_score"],
        "icl_se": s["icl_se"], "icl_by_example": s["icl_by_example"],
        "loss_by_position": s["loss_by_position"],
        "prefix_matching": s["prefix_matching"], "previous_token": s["previous_token"],
        "copying": s["copying"], "copying_empirical": s["copying_empirical"],
        "ablation_icl": s["ablation_icl"], "composition": s["composition"],
        "per_token_loss": s["per_token_loss"],
        **{k: s[k] for k in ("llc", "llc_std", "llc_loss_trace", "llc_diverged",
                             "llc_messages", "llc_heads") if k in s},
        "phase_change": phase_change_of(s),
        "induction_heads": induction_heads(s["prefix_matching"][-1], s["copying"][-1],
                                           e.induction_prefix_threshold,
                                           e.induction_copying_threshold),
    }


# the modules whose code decides a snapshot's scores (this one too: scorer, score_run): an
# edit to any of them rescores
SCORING_CODE = ("analysis", "scores", "model", "data", "corpus", "llc", "head_llc")
# what a saved scores.json keeps per snapshot (the rest, phase change and induction heads,
# is derived again by _record with the code as it stands)
_PER_SNAPSHOT = ("icl_score", "icl_se", "icl_by_example", "loss_by_position", "prefix_matching",
                 "previous_token", "copying", "copying_empirical", "ablation_icl",
                 "per_token_loss", "llc", "llc_std", "llc_loss_trace")


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    import importlib
    h = hashlib.sha256()
    for name in SCORING_CODE:
        h.update(pathlib.Path(importlib.import_module(f"icl_jax.{name}").__file__).read_bytes())
    return h.hexdigest()[:16]


def scoring_key(run: checkpoints.Run, ablation: str, llc: bool, llc_heads=None) -> str:
    """A digest of everything a run's scores follow from: its snapshots' steps, its whole
    config, the ablation kind, whether the LLC is estimated (and every head's: a HeadView),
    and the scoring code."""
    heads = {"llc_heads": dataclasses.asdict(llc_heads)} if llc_heads else {}
    what = json.dumps({"steps": [int(s) for s in run.steps], "config": run.config.to_dict(),
                       "ablation": ablation, "llc": bool(llc), "code": _code_digest(), **heads},
                      sort_keys=True, default=str)
    return hashlib.sha256(what.encode()).hexdigest()[:24]


def saved_scores(path, key: str) -> dict | None:
    """The per-snapshot scores of a scores.json written under the same scoring_key (numeric
    series as numpy arrays), or None: no file, an unreadable one, or other settings."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return _per_snapshot(saved) if saved.get("scored_with") == key else None


def _per_snapshot(saved: dict) -> dict:
    """Per-snapshot scores as saved (lists, rounded, None for non-finite) -> numpy arrays."""
    per = {k: (np.asarray(v, dtype=float) if k in _PER_SNAPSHOT else v) for k, v in saved.items()}
    per["steps"], per["tokens"] = np.asarray(saved["steps"]), np.asarray(saved["tokens"])
    return per


def last_snapshot(run: checkpoints.Run, step: int) -> LastSnapshot:
    """The LastSnapshot score_run would have kept, for a run whose scores are reused: its
    params, the evaluation inputs and the attention on the first probe sequence."""
    source = data_lib.make_source(run.config, run.workdir)
    inputs = scores.evaluation_inputs(run.config, source)
    params = run.params(step)
    _, cache = run.model.apply({"params": params}, inputs["probe_BT"][:1])  # the figure's one
    return LastSnapshot(run, step, params, inputs, np.asarray(cache["attention"][0]))


def shared_pca(runs: dict) -> dict:
    """One PCA over every snapshot's per-token losses of every run, and each run's trajectory
    in it (with its turn at the phase change); none if the runs' vectors differ in length."""
    names = list(runs)
    vecs = [np.asarray(runs[n]["per_token_loss"], np.float64) for n in names]
    pca = {"trajectories": {}, "explained": [], "same_length": len({v.shape[1] for v in vecs}) == 1}
    if pca["same_length"]:
        fit = fit_pca(np.concatenate(vecs))
        pca["explained"] = fit["explained"].tolist()
        offsets = np.cumsum([0] + [len(v) for v in vecs])
        for i, n in enumerate(names):
            P = fit["project"][offsets[i]:offsets[i + 1]]
            turn = trajectory_turn(P, runs[n]["steps"], runs[n]["phase_change"])
            pca["trajectories"][n] = {"steps": runs[n]["steps"], "points": P.tolist(), **turn}
    return pca


def analyze(workdirs, out: str | None = None, chunk: int = 16, progress: bool = True,
            ablation: str = "pattern", llc=False, rescore: bool = False,
            measure: dict | None = None, llc_heads=None) -> dict:
    """Scores every snapshot of every run and writes scores.json and pca.json; the figures
    and report.html are report.write_report's, from what this returns.

    A run whose scores.json was written under the same scoring_key (same snapshots, config,
    ablation, LLC or not, and scoring code) is not scored again: its per-snapshot scores are
    read back (the phase change and induction heads derived again) and only its last
    snapshot is restored, for the figures. rescore: score every run regardless.
    measure: eval and llc overrides every run is measured with instead of its saved values
    (more evaluation examples for a less noisy ICL score, for example); see open_run.

    One run: everything goes to `out` (default <workdir>/analysis). Several runs: each
    run's files go to out/<run name>/ and the shared PCA and report to `out` (default
    <common parent>/analysis). Returns {"runs": {name: scores}, "pca": {...}, "out": dir,
    "last": {name: LastSnapshot}} where scores is what scores.json holds (lists), with the
    run's "workdir". llc: True estimates the local learning coefficient of every snapshot of
    every run (see score_run), or a collection of run names, of those runs only. llc_heads:
    a head_llc.HeadView, every head's refined LLC of every run, or {run name: HeadView}, of
    those runs only (score_run).
    """
    if isinstance(workdirs, str):
        workdirs = [workdirs]
    if not workdirs:
        raise FileNotFoundError("no workdir given; pass at least one run's --workdir")
    names = _run_names(workdirs)
    single = len(workdirs) == 1
    if out is None:
        out = (str(workdir_lib.path(workdirs[0]) / "analysis") if single else
               os.path.join(os.path.commonpath([workdir_lib.absolute(w) for w in workdirs]),
                            "analysis"))
    opened = {name: open_run(w, measure) for name, w in zip(names, workdirs)}  # fail fast
    runs, last = {}, {}
    for name, run in opened.items():
        with_llc = llc is True or (bool(llc) and name in llc)
        run_dir = workdir_lib.path(out) if single else workdir_lib.path(out) / name
        view = llc_heads.get(name) if isinstance(llc_heads, dict) else llc_heads
        key = scoring_key(run, ablation, with_llc, view)
        per = None if rescore else saved_scores(run_dir / "scores.json", key)
        if per is not None:
            last[name] = last_snapshot(run, int(per["steps"][-1]))
            if progress:
                print(f"scoring {run.workdir}: reusing {run_dir / 'scores.json'} (same "
                      f"{len(per['steps'])} snapshots, config, ablation and scoring code; "
                      "--rescore scores again)", file=sys.stderr, flush=True)
        else:
            per, last[name] = score_run(run, chunk, ablation, progress, llc=with_llc,
                                        llc_heads=view)
            # derived from the numbers as saved, so that a reuse derives the same
            per = _per_snapshot(_jsonable(per))
        runs[name] = _jsonable({**_record(name, run, per, ablation), "scored_with": key})
        workdir_lib.write_text(run_dir / "scores.json", json.dumps(runs[name]))
    pca = shared_pca(runs)
    workdir_lib.write_text(workdir_lib.path(out) / "pca.json", json.dumps(_jsonable(pca)))
    result = {"runs": runs, "pca": pca, "out": out, "last": last}
    return result


def headline(result) -> list[dict]:
    """One row of headline numbers per run (what the report's table shows)."""
    rows = []
    for name, run in result["runs"].items():
        pc = run["phase_change"]
        pm = np.asarray(run["prefix_matching"][-1])
        abl = np.asarray(run["ablation_icl"][-1])
        traj = result["pca"]["trajectories"].get(name, {})
        rows.append({
            "run": name, "layers": pm.shape[0], "heads": pm.shape[1],
            "last step": run["steps"][-1], "snapshots": len(run["steps"]),
            "ICL score (last)": run["icl_score"][-1],
            "phase change": (f"steps {pc['start_step']}–{pc['end_step']} "
                             f"(tokens {pc['start_tokens']:,}–{pc['end_tokens']:,})"
                             if pc["detected"] else f"none ({pc['reason']})"),
            "ICL before → after": (f"{pc['icl_before']:.3f} → {pc['icl_after']:.3f}"
                                   if pc["detected"] else "–"),
            "max prefix matching (last)": float(pm.max()),
            "induction heads": ", ".join(f"L{l}H{h}" for l, h in run["induction_heads"]) or "none",
            "largest ablation effect": (f"L{np.unravel_index(abl.argmax(), abl.shape)[0]}"
                                        f"H{np.unravel_index(abl.argmax(), abl.shape)[1]} "
                                        f"+{abl.max():.3f}"),
            "PCA turn at the phase change": (f"{traj['turn_deg']:.0f}°"
                                             if traj.get("turn_deg") is not None else "–"),
        })
    return rows
