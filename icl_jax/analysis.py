"""From snapshots to scores, the phase change, the PCA, figures and a report.

analyze(["runs/2l", "runs/1l"]) scores every snapshot of every run (in chunks,
one jitted call per chunk, vmapped or mapped), finds the phase change, fits one PCA over
all runs, and writes scores.json, PNG figures and report.html. The pure pieces
(detect_phase_change, fit_pca, trajectory_turn, plot_*) are usable on their own.
"""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from icl_jax import checkpoints, config as config_lib, scores
from icl_jax.model import init_params, make_model


# ----------------------------------------------------------------------------- phase change

def _gaussian_smooth(y, sigma_points):
    if sigma_points <= 0:
        return y
    r = int(math.ceil(4 * sigma_points))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_points) ** 2)
    k /= k.sum()
    padded = np.pad(y, r, mode="edge")
    return np.convolve(padded, k, mode="valid")


def detect_phase_change(steps, icl, tokens=None, *, axis: str = "log", smooth: float = 0.05,
                        frac: float = 0.3, min_drop: float = 0.1, min_share: float = 0.4,
                        max_width: float = 1.0, grid: int = 512) -> dict:
    """The training window in which the ICL score drops abruptly, by a stated rule.

    Rule:
      1. x = ln(step) (axis "log"; step 0 is left out) or step (axis "linear").
      2. Interpolate the ICL score linearly onto `grid` even points in x and smooth it
         with a Gaussian of standard deviation `smooth` (in x units; for axis
         "linear" a fraction of the step range).
      3. rate = -d(ICL)/dx; the peak is its maximum.
      4. The window is the contiguous span around the peak where rate > frac * peak.
      5. Detected only if: the drop across the window is at least `min_drop` nats,
         and at least `min_share` of the smoothed curve's whole fall (from its highest
         point to its lowest point after it; early training first raises the score);
         the window spans at most `max_width` in x (log axis: 1.0 = a factor e of
         steps; a smooth, slowly improving curve is spread wider); and the window
         ends before the last snapshot (the score has settled again).
    Returns {detected, reason, start_step, end_step, peak_step, start_tokens,
    end_tokens, icl_before, icl_after, drop}; steps are those of the window's
    edges in the smoothed curve, ICL before/after the smoothed values there.
    """
    steps = np.asarray(steps, np.float64)
    icl = np.asarray(icl, np.float64)
    order = np.argsort(steps)
    steps, icl = steps[order], icl[order]
    keep = np.isfinite(icl) & ((steps > 0) if axis == "log" else np.ones_like(steps, bool))
    steps, icl = steps[keep], icl[keep]
    out = {"detected": False, "reason": "", "rule": {
        "axis": axis, "smooth": smooth, "frac": frac, "min_drop": min_drop,
        "min_share": min_share, "max_width": max_width},
        "start_step": None, "end_step": None, "peak_step": None, "start_tokens": None,
        "end_tokens": None, "icl_before": None, "icl_after": None, "drop": None}
    if len(steps) < 4:
        out["reason"] = f"too few snapshots ({len(steps)}) to find a phase change"
        return out
    x = np.log(steps) if axis == "log" else steps
    xg = np.linspace(x[0], x[-1], grid)
    dx = xg[1] - xg[0]
    sigma = smooth if axis == "log" else smooth * (x[-1] - x[0])
    yg = _gaussian_smooth(np.interp(xg, x, icl), sigma / dx)
    rate = -np.gradient(yg, dx)
    p = int(np.argmax(rate))
    if rate[p] <= 0:
        out["reason"] = "the ICL score never decreases"
        return out
    above = rate > frac * rate[p]
    a = p
    while a > 0 and above[a - 1]:
        a -= 1
    b = p
    while b < grid - 1 and above[b + 1]:
        b += 1
    to_step = (lambda v: float(np.exp(v))) if axis == "log" else float
    drop = float(yg[a] - yg[b])
    top = int(np.argmax(yg))  # the score first rises from its value at initialisation
    total = float(yg[top] - yg[top:].min())
    width = float(xg[b] - xg[a])
    out.update(start_step=round(to_step(xg[a])), end_step=round(to_step(xg[b])),
               peak_step=round(to_step(xg[p])), icl_before=float(yg[a]),
               icl_after=float(yg[b]), drop=drop)
    if tokens is not None:  # tokens grow linearly with steps
        tokens = np.asarray(tokens, np.float64)[order][keep]
        per_step = tokens[-1] / steps[-1] if steps[-1] else 0.0
        out.update(start_tokens=round(out["start_step"] * per_step),
                   end_tokens=round(out["end_step"] * per_step))
    if drop < min_drop:
        out["reason"] = f"the steepest drop is only {drop:.3f} nats (< {min_drop})"
    elif drop < min_share * total:
        out["reason"] = (f"the steepest drop ({drop:.3f}) is under {min_share:.0%} of the "
                         f"score's whole fall after its peak ({total:.3f})")
    elif width > max_width:
        out["reason"] = (f"the drop is spread over {width:.2f} {axis}-step units "
                         f"(> {max_width}): gradual, not abrupt")
    elif b == grid - 1:
        out["reason"] = "the score is still falling at the last snapshot"
    else:
        out["detected"] = True
        out["reason"] = "abrupt drop"
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


# ----------------------------------------------------------------------------- scoring

def _model_from_json(model_json: str):
    return make_model(json.loads(model_json))


STACKING = ("vmap", "map")


def default_stacking() -> str:
    """How a chunk of snapshots is scored in one program on this backend.

    XLA's CPU code runs vmapped per-snapshot products as slow batched kernels (16
    snapshots vmapped took 1.6x as long as a loop over them); one snapshot after another
    inside the program (lax.map) does not. Accelerators take the vmapped batch.
    """
    return "map" if jax.devices()[0].platform == "cpu" else "vmap"


@functools.lru_cache(maxsize=8)
def _scorer(model_json: str, early: int, late: int, n_tokens: int, ablation: str,
            stacking: str | None):
    """The jitted scorer of one snapshot (stacking None) or of a stack of them (stacking
    "vmap": jax.vmap; "map": jax.lax.map); cached so that analysing several runs of one
    architecture compiles once."""
    model = _model_from_json(model_json)

    def score(params, eval_BT1, probe_BT, index_B):
        # one clean run on the evaluation set and one on the probe serve every score
        losses_BT, cache, icl = scores.clean_run(model, params, eval_BT1, early, late)
        losses_T = losses_BT.mean(0)
        _, probe_cache = model.apply({"params": params}, probe_BT)
        return {
            "loss_by_position": losses_T,
            "icl_score": icl,
            "per_token_loss": jnp.take_along_axis(losses_BT, index_B[:, None], axis=1)[:, 0],
            "prefix_matching": scores.prefix_matching_from_attention(
                probe_cache["attention"], probe_BT, n_tokens),
            "previous_token": scores.previous_token_from_attention(cache["attention"]),
            "copying": scores.copying(model, params),
            "copying_empirical": scores.copying_empirical_from_cache(
                model, params, probe_cache, probe_BT, n_tokens),
            "ablation_icl": scores.head_ablation_icl(model, params, eval_BT1, early, late,
                                                     ablation, head_batch=1, clean=(cache, icl)),
            "composition": scores.composition(model, params),
        }

    if stacking == "vmap":
        return jax.jit(jax.vmap(score, in_axes=(0, None, None, None)))
    if stacking == "map":
        return jax.jit(lambda stacked, *inputs: jax.lax.map(lambda p: score(p, *inputs), stacked))
    if stacking is not None:
        raise ValueError(f"stacking must be one of {STACKING} or None, got {stacking!r}")
    return jax.jit(score)


class _RunReader:
    """The pieces of a workdir analysis needs, restoring one snapshot at a time."""

    def __init__(self, workdir: str):
        path = os.path.join(workdir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{workdir!r} holds no run (no config.json); pass the "
                                    "--workdir a training run wrote")
        with open(path) as f:
            self.config = config_lib.from_json(f.read())
        self.workdir = workdir
        self.model = make_model(self.config.model)
        self.model_json = json.dumps(self.model.cfg, sort_keys=True)
        self.abstract = jax.eval_shape(lambda: init_params(self.model, jax.random.key(0)))
        if not os.path.isdir(os.path.join(workdir, "snapshots")):
            raise FileNotFoundError(f"{workdir!r} has no snapshots yet")
        self.store = checkpoints.Store(workdir, read_only=True)
        self.steps = self.store.steps()
        if not self.steps:
            raise FileNotFoundError(f"{workdir!r} has no snapshots yet")

    def params(self, step):
        return self.store.restore_params(step, self.abstract)

    def inputs(self):
        """(eval set, probe, PCA indices): the trainer's own evaluation data."""
        from icl_jax import data as data_lib
        c, e = self.config, self.config.eval
        source = data_lib.make_source(c, self.workdir)
        eval_BT1 = source.eval_set(e.n_examples, c.model.context + 1)
        probe_BT = scores.make_probe(source.token_frequencies(), e.probe_tokens, e.probe_repeats,
                                     e.probe_sequences, e.probe_exclude_frac, e.bos_token, c.seed)
        index_B = scores.pca_token_indices(e.n_examples, c.model.context, c.seed)
        return eval_BT1, probe_BT, index_B


def _stack(trees):
    return jax.tree.map(lambda *a: np.stack(a), *trees)


def score_run(workdir: str, chunk: int = 16, ablation: str = "pattern",
              progress: bool = True, stacking: str | None = None) -> dict:
    """Scores every snapshot of one run; the per-snapshot part of scores.json (numpy arrays).

    Snapshots are restored `chunk` at a time, stacked on a leading axis and scored in
    one jitted call (vmapped, or mapped on CPU: see default_stacking); the last chunk is
    padded to `chunk` (by repeating its last snapshot) so that every call has the same
    shape and nothing recompiles.
    """
    run = _RunReader(workdir)
    e = run.config.eval
    inputs = run.inputs()
    scorer = _scorer(run.model_json, e.icl_early_index, e.icl_late_index, e.probe_tokens,
                     ablation, stacking or default_stacking())
    results, t0, good = [], time.perf_counter(), []

    def score(steps, trees):
        trees = trees + [trees[-1]] * (chunk - len(trees))
        out = jax.device_get(scorer(_stack(trees), *inputs))
        results.append(jax.tree.map(lambda a: a[:len(steps)], out))
        if progress:
            print(f"scoring {workdir}: {len(good)}/{len(run.steps)} snapshots "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    batch_steps, batch_trees = [], []
    for step in run.steps:
        try:
            tree = run.params(step)
        except Exception as e:  # a damaged snapshot costs itself, not the analysis
            print(f"warning: skipping snapshot {step} of {workdir}: it cannot be restored "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:160]})", file=sys.stderr)
            continue
        good.append(step)
        batch_steps.append(step)
        batch_trees.append(tree)
        if len(batch_steps) == chunk:
            score(batch_steps, batch_trees)
            batch_steps, batch_trees = [], []
    if batch_steps:
        score(batch_steps, batch_trees)
    if not good:
        raise FileNotFoundError(f"no snapshot of {workdir!r} can be restored")
    run.steps = good
    per = jax.tree.map(lambda *a: np.concatenate(a), *results)
    tokens_per_step = run.config.train.batch_size * run.config.model.context
    per["steps"] = np.asarray(run.steps)
    per["tokens"] = per["steps"] * tokens_per_step
    return {"run": run, "scores": per}


# ----------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _steps_axis(ax, steps):
    ax.set_xlabel("training step")
    if np.max(steps) > 0:
        ax.set_xscale("symlog", linthresh=max(1, np.sort(steps)[min(1, len(steps) - 1)]))


def plot_icl(run: dict):
    """ICL score over training, the detected phase-change window shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(run["steps"], run["icl_score"], "o-", ms=3)
    pc = run["phase_change"]
    if pc.get("start_step") is not None:
        ax.axvspan(pc["start_step"], pc["end_step"], color="C1",
                   alpha=0.3 if pc["detected"] else 0.08,
                   label="phase change" if pc["detected"] else "steepest drop (not abrupt)")
        ax.legend()
    _steps_axis(ax, run["steps"])
    ax.set_ylabel("ICL score (nats)")
    ax.set_title(f"{run['name']}: in-context learning score")
    fig.tight_layout()
    return fig


def plot_loss_heatmap(run: dict):
    """Loss by context index over (step, log index), and its derivative dLoss/d ln(i)."""
    plt = _plt()
    raw = np.asarray(run["loss_by_position"], np.float64)  # [N, T]
    # On an even grid in ln(i), smoothed: per-index noise would swamp the derivative.
    idx = np.unique(np.geomspace(1, raw.shape[1], 48).round().astype(int))
    lg = np.log(idx)
    fine = np.linspace(0, np.log(raw.shape[1]), 256)
    interp = np.stack([np.interp(fine, np.log(np.arange(1, raw.shape[1] + 1)), r) for r in raw])
    smooth = np.stack([_gaussian_smooth(r, 0.1 / (fine[1] - fine[0])) for r in interp])
    loss = np.stack([np.interp(lg, fine, r) for r in smooth])
    deriv = np.stack([np.interp(lg, fine, np.gradient(r, fine)) for r in smooth])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(run["steps"]))
    for ax, z, title, cmap in ((axes[0], loss, "loss (nats)", "viridis"),
                               (axes[1], deriv, "dLoss / d ln(i)", "RdBu_r")):
        kw = {}
        if cmap == "RdBu_r":
            m = np.nanpercentile(np.abs(deriv), 99) or 1.0
            kw = dict(vmin=-m, vmax=m)
        im = ax.pcolormesh(x, idx, z.T, shading="nearest", cmap=cmap, **kw)
        ax.set_yscale("log")
        ax.set_ylabel("context index i")
        ticks = np.linspace(0, len(x) - 1, min(6, len(x))).astype(int)
        ax.set_xticks(ticks, [str(run["steps"][t]) for t in ticks])
        ax.set_xlabel("snapshot step")
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def _per_head_lines(ax, steps, values_NLH, title, legend=False):
    v = np.asarray(values_NLH)
    labelled = v.shape[1] * v.shape[2] <= 16  # more heads than that: colour by layer only
    for l in range(v.shape[1]):
        for h in range(v.shape[2]):
            ax.plot(steps, v[:, l, h], color=f"C{l}", alpha=0.5 + 0.5 * (h == v[-1, l].argmax()),
                    label=f"L{l}H{h}" if labelled else None)
    _steps_axis(ax, steps)
    ax.set_title(title)
    if legend and labelled:
        ax.legend(fontsize=7, ncol=2)


def plot_head_scores(run: dict):
    """Prefix-matching and previous-token scores of every head over training."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    _per_head_lines(axes[0], run["steps"], run["prefix_matching"], "prefix matching")
    _per_head_lines(axes[1], run["steps"], run["previous_token"], "previous token", legend=True)
    fig.tight_layout()
    return fig


def plot_copying_vs_prefix(run: dict, snapshot: int = -1):
    """Copying (weights) against prefix matching, every head, at one snapshot."""
    plt = _plt()
    pm = np.asarray(run["prefix_matching"])[snapshot]
    cp = np.asarray(run["copying"])[snapshot]
    fig, ax = plt.subplots(figsize=(5, 4))
    for l in range(pm.shape[0]):
        ax.scatter(pm[l], cp[l], color=f"C{l}", label=f"layer {l}")
        for h in range(pm.shape[1]):
            ax.annotate(f"{l}.{h}", (pm[l, h], cp[l, h]), fontsize=7)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("prefix matching")
    ax.set_ylabel("copying (eigenvalues of OV circuit)")
    ax.set_title(f"{run['name']}: heads at step {run['steps'][snapshot]}")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_ablation(run: dict):
    """Each head's attribution to ICL (ICL ablated - ICL clean) over training."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _per_head_lines(ax, run["steps"], run["ablation_icl"], "ablation: ICL(ablated) - ICL(clean)",
                    legend=True)
    ax.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    return fig


def plot_pca(pca: dict):
    """Every run's trajectory in the first two principal components of per-token losses."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, (name, traj) in enumerate(pca["trajectories"].items()):
        P = np.asarray(traj["points"])
        ax.plot(P[:, 0], P[:, 1], "-o", ms=2, color=f"C{i}",
                label=name if traj["turn_deg"] is None
                else f"{name} (turns {traj['turn_deg']:.0f}° at the phase change)")
        ax.plot(*P[0], "k^", ms=5)
    ev = pca["explained"]
    ax.set_xlabel(f"PC1 ({ev[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "PC2")
    ax.set_title("per-token loss PCA (triangle: first snapshot)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_attention(pattern_TS, title: str = "attention"):
    """One head's attention pattern [T, S] (e.g. on a repeated sequence)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(np.asarray(pattern_TS), cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


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


def _save(fig, path):
    fig.savefig(path, dpi=90)
    _plt().close(fig)


def analyze(workdirs, out: str | None = None, chunk: int = 16, progress: bool = True,
            ablation: str = "pattern", figures: bool = True) -> dict:
    """Scores every snapshot of every run and writes scores.json, figures and report.html.

    One run: everything goes to `out` (default <workdir>/analysis). Several runs: each
    run's files go to out/<run name>/ and the shared PCA and report to `out` (default
    <common parent>/analysis). Returns {"runs": {name: scores}, "pca": {...}, "out": dir}
    where scores is what scores.json holds (lists), plus the run's "workdir".
    """
    if isinstance(workdirs, str):
        workdirs = [workdirs]
    if not workdirs:
        raise FileNotFoundError("no workdir given; pass at least one run's --workdir")
    names = _run_names(workdirs)
    single = len(workdirs) == 1
    if out is None:
        out = (os.path.join(workdirs[0], "analysis") if single else
               os.path.join(os.path.commonpath([os.path.abspath(w) for w in workdirs]),
                            "analysis"))
    readers = {name: _RunReader(w) for name, w in zip(names, workdirs)}  # fail fast on all
    runs, extras = {}, {}
    for name, w in zip(names, workdirs):
        scored = score_run(w, chunk, ablation, progress)
        run, s = scored["run"], scored["scores"]
        e = run.config.eval
        pc = detect_phase_change(s["steps"], s["icl_score"], s["tokens"])
        pm_last, cp_last = s["prefix_matching"][-1], s["copying"][-1]
        induction = [[int(l), int(h)] for l, h in zip(*np.nonzero(
            (pm_last > e.induction_prefix_threshold) & (cp_last > e.induction_copying_threshold)))]
        record = {
            "name": name, "workdir": os.path.abspath(w),
            "icl_indices": {"early": e.icl_early_index, "late": e.icl_late_index},
            "ablation_kind": ablation,
            "thresholds": {"prefix_matching": e.induction_prefix_threshold,
                           "copying": e.induction_copying_threshold},
            "steps": s["steps"], "tokens": s["tokens"], "icl_score": s["icl_score"],
            "loss_by_position": s["loss_by_position"],
            "prefix_matching": s["prefix_matching"], "previous_token": s["previous_token"],
            "copying": s["copying"], "copying_empirical": s["copying_empirical"],
            "ablation_icl": s["ablation_icl"], "composition": s["composition"],
            "per_token_loss": s["per_token_loss"],
            "phase_change": pc, "induction_heads": induction,
        }
        runs[name] = _jsonable(record)
        extras[name] = (run, s)
        run_dir = out if single else os.path.join(out, name)
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "scores.json"), "w") as f:
            json.dump(runs[name], f)

    # --- one PCA over every snapshot of every run
    vecs = [np.asarray(runs[n]["per_token_loss"], np.float64) for n in names]
    pca = {"trajectories": {}, "explained": [], "same_length": len({v.shape[1] for v in vecs}) == 1}
    if pca["same_length"]:
        fit = fit_pca(np.concatenate(vecs))
        pca["explained"] = fit["explained"].tolist()
        offsets = np.cumsum([0] + [len(v) for v in vecs])
        for i, n in enumerate(names):
            P = fit["project"][offsets[i]:offsets[i + 1]]
            turn = trajectory_turn(P, runs[n]["steps"], runs[n]["phase_change"])
            pca["trajectories"][n] = {"steps": runs[n]["steps"], "points": P.tolist(), **turn,
}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "pca.json"), "w") as f:
        json.dump(_jsonable(pca), f)

    result = {"runs": runs, "pca": pca, "out": out}
    if figures:
        _figures_and_report(result, extras, single, progress)
    return result


def _strongest_induction_head(run):
    pm = np.asarray(run["prefix_matching"][-1])
    l, h = np.unravel_index(np.argmax(pm), pm.shape)
    return int(l), int(h)


def _figures_and_report(result, extras, single, progress):
    out = result["out"]
    figs = []  # (title, relative path)
    for name, run in result["runs"].items():
        run_dir = out if single else os.path.join(out, name)
        reader, s = extras[name]
        l, h = _strongest_induction_head(run)
        probe = reader.inputs()[1][:1]
        _, cache = reader.model.apply({"params": reader.params(reader.steps[-1])}, probe)
        makers = [("icl", lambda: plot_icl(run)), ("loss_heatmap", lambda: plot_loss_heatmap(run)),
                  ("head_scores", lambda: plot_head_scores(run)),
                  ("copying_vs_prefix", lambda: plot_copying_vs_prefix(run)),
                  ("ablation", lambda: plot_ablation(run)),
                  ("attention", lambda: plot_attention(
                      np.asarray(cache["attention"])[0, l, h],
                      f"{name}: L{l}H{h} on a repeated sequence, step {run['steps'][-1]}"))]
        for fname, make in makers:
            path = os.path.join(run_dir, f"{fname}.png")
            _save(make(), path)
            figs.append((f"{name}: {fname.replace('_', ' ')}", os.path.relpath(path, out)))
    if result["pca"]["trajectories"]:
        _save(plot_pca(result["pca"]), os.path.join(out, "pca.png"))
        figs.append(("per-token loss PCA", "pca.png"))
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write(report_html(result, figs))
    if progress:
        print(f"wrote {path}", file=sys.stderr, flush=True)


def _fmt(v, spec="{:.3f}"):
    return "–" if v is None else spec.format(v)


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


def add_to_report(path: str, markdown: str):
    """Puts a short markdown text (a title, a table, bullets) at the top of report.html."""
    def inline(t):
        t = html.escape(t)
        while "**" in t:
            t = t.replace("**", "<b>", 1).replace("**", "</b>", 1)
        return t.replace("`", "")
    out, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|- "):
                rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</{'th' if i == 0 else 'td'}>"
                                 for c in r) + "</tr>" for i, r in enumerate(rows)) + "</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level + 1}>{inline(line.lstrip('#').strip())}</h{level + 1}>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    with open(path) as f:
        page = f.read()
    marker = "<h1>In-context learning and induction heads</h1>"
    page = page.replace(marker, marker + "".join(out), 1)
    with open(path, "w") as f:
        f.write(page)


def report_html(result, figs) -> str:
    """A self-contained page: a table of headline numbers and every figure, embedded."""
    rows = headline(result)
    cols = list(rows[0])
    cell = lambda v: html.escape(_fmt(v) if isinstance(v, float) else str(v))
    table = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in cols) + "</tr>"
                       for r in rows) + "</table>")
    imgs = []
    for title, rel in figs:
        with open(os.path.join(result["out"], rel), "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        imgs.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(title)}'>"
                    f"<figcaption>{html.escape(title)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:90%}figure{display:inline-block;margin:1em}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>icl_jax analysis</title>"
            f"<style>{style}</style></head><body><h1>In-context learning and induction heads"
            f"</h1>{table}<p>Phase change: the rule of icl_jax.analysis.detect_phase_change "
            f"(ln-step axis, smoothed; window where -dICL/d ln step exceeds 30% of its peak; "
            f"drop &ge; 0.1 nats and &ge; 40% of the score's fall after its peak, within a factor e of steps)."
            f"</p>{''.join(imgs)}</body></html>")
