"""The paper's figures, drawn from an analysis (analysis.analyze's result) on the paper's axes.

Every plot_* takes one run's scores (what scores.json holds), the whole result, or the shared
PCA, and returns a matplotlib Figure, so that a notebook can show it inline; report.py saves
them and writes the page. Time runs along training tokens (a linear axis, as the paper draws
its small models, with the step on a second axis above) or, where a log axis is needed to see
early training, along log tokens; never along snapshot indices. Nothing here restores a
snapshot: the attention figure reads the pattern the analysis kept of the last one.
"""
from __future__ import annotations

import sys

import numpy as np


def pyplot():
    """matplotlib.pyplot, on the Agg backend (files, no display) unless in a notebook, whose
    inline backend must stay as it is."""
    import matplotlib
    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ----------------------------------------------------------------------------- axes

def tokens_per_step(run: dict) -> float:
    """Training tokens per step of a run (its tokens over its steps, at the last snapshot)."""
    steps, tokens = np.asarray(run["steps"], np.float64), np.asarray(run["tokens"], np.float64)
    return float(tokens[-1] / steps[-1]) if steps[-1] else 1.0


def _tokens_axis(ax, per_step: float, log: bool = False, steps_on_top: bool = True):
    """x in training tokens (engineering notation), the step on a second axis above."""
    from matplotlib.ticker import EngFormatter
    ax.set_xlabel("training tokens" + (" (log)" if log else ""))
    if log:
        ax.set_xscale("log")
    else:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    if steps_on_top and per_step > 0:
        top = ax.secondary_xaxis("top", functions=(lambda t: t / per_step,
                                                   lambda s: s * per_step))
        top.set_xlabel("training step", fontsize=8)
        top.tick_params(labelsize=7)
        if not log:
            top.xaxis.set_major_formatter(EngFormatter(sep=""))


def window_tokens(run: dict):
    """(start, end) in tokens of the run's detected phase change, else None."""
    pc = run["phase_change"]
    if not pc.get("detected") or pc.get("start_step") is None:
        return None
    per = tokens_per_step(run)
    return (pc.get("start_tokens") or pc["start_step"] * per,
            pc.get("end_tokens") or pc["end_step"] * per)


def onset_tokens(run: dict):
    """Tokens at which the detected phase change's fall begins (its onset_step, where the
    rule gives one and it precedes the window's start), else None."""
    pc = run["phase_change"]
    onset = pc.get("onset_step")
    if not pc.get("detected") or onset is None or onset >= pc["start_step"]:
        return None
    return onset * tokens_per_step(run)


def _shade(ax, run, color="0.55", alpha=0.25, label="phase change"):
    w = window_tokens(run)
    if w is not None:
        ax.axvspan(*w, color=color, alpha=alpha, lw=0, label=label)
    return w


def _head_names(L, H):
    return [f"L{l}H{h}" for l in range(L) for h in range(H)]


def _induction(run) -> set:
    return {tuple(x) for x in run.get("induction_heads", [])}


def _legend_outside(ax, fig=None, fontsize=7, ncol=1):
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize=fontsize, ncol=ncol, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


# ----------------------------------------------------------------------------- argument 1

def best_layer_heads(run) -> tuple[np.ndarray, str]:
    """The prefix matching [snapshot] a run's induction heads show across training: the best
    of its induction heads at each snapshot, or, where it has none, its best head in layers
    >= 1 (any layer for a one-layer model); and a label saying which."""
    pm = np.asarray(run["prefix_matching"], np.float64)  # [N, L, H]
    heads = sorted(_induction(run))
    if heads:
        return (np.max([pm[:, l, h] for l, h in heads], axis=0),
                "induction heads " + ", ".join(f"L{l}H{h}" for l, h in heads))
    later = pm[:, 1:] if pm.shape[1] > 1 else pm
    return later.reshape(len(pm), -1).max(-1), "no induction head: best head" + (
        " in layers >= 1" if pm.shape[1] > 1 else "")


def plot_family(result):
    """Every run's ICL score against training tokens (shaded: each one's phase change), and
    beside it the prefix matching of its induction heads: reproduce's family.png."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    per = 1.0
    for i, (name, run) in enumerate(result["runs"].items()):
        tokens = np.asarray(run["tokens"], np.float64)
        per = tokens_per_step(run)
        a.plot(tokens, run["icl_score"], "-", color=f"C{i}", label=name, lw=1.5)
        _shade(a, run, color=f"C{i}", alpha=0.12, label=None)
        pm, which = best_layer_heads(run)
        b.plot(tokens, pm, "-" if run.get("induction_heads") else "--", color=f"C{i}",
               label=f"{name}: {which}", lw=1.5)
        _shade(b, run, color=f"C{i}", alpha=0.12, label=None)
    a.axhline(0, color="0.5", lw=0.5)
    a.set(ylabel="ICL score (nats)", title="in-context learning score")
    b.set(ylabel="prefix matching", ylim=(0, 1),
          title="prefix matching of the induction heads")
    for ax in (a, b):
        _tokens_axis(ax, per)
    a.legend(fontsize=8, loc="lower left")
    _legend_outside(b, fontsize=7)
    return fig


def plot_heads(ax, tokens, v_NLH, induction, bold_lw: float, faint_alpha: float):
    """One curve per head of a [snapshot, layer, head] score, coloured by layer, the
    induction heads bold and labelled so."""
    for layer in range(v_NLH.shape[1]):
        for h in range(v_NLH.shape[2]):
            bold = (layer, h) in induction
            ax.plot(tokens, v_NLH[:, layer, h], color=f"C{layer}",
                    lw=bold_lw if bold else 0.8, alpha=1.0 if bold else faint_alpha,
                    label=f"L{layer}H{h}" + (" (induction)" if bold else ""))


def plot_icl(run: dict):
    """One run: the ICL score against tokens (with its standard error, the phase change
    shaded) and beside it the prefix matching of every head, its induction heads bold."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.0), layout="constrained")
    tokens = np.asarray(run["tokens"], np.float64)
    icl = np.asarray(run["icl_score"], np.float64)
    a.plot(tokens, icl, "o-", ms=3, color="C0", label="ICL score")
    if run.get("icl_se") is not None:
        se = np.asarray(run["icl_se"], np.float64)
        a.fill_between(tokens, icl - se, icl + se, color="C0", alpha=0.2, lw=0,
                       label="± standard error")
    _shade(a, run, label="phase change" if run["phase_change"].get("detected") else None)
    onset = onset_tokens(run)
    if onset is not None:
        a.axvline(onset, color="0.3", ls=":", lw=1, label="its onset (the fall begins)")
    a.axhline(0, color="0.5", lw=0.5)
    e, l = run.get("icl_indices", {}).get("early"), run.get("icl_indices", {}).get("late")
    a.set(ylabel="ICL score (nats)", title=f"{run['name']}: in-context learning score"
          + (f"\nloss at token {l} minus loss at token {e}" if e is not None else ""))
    a.legend(fontsize=8)
    pm = np.asarray(run["prefix_matching"], np.float64)
    ind = _induction(run)
    plot_heads(b, tokens, pm, ind, bold_lw=2.2, faint_alpha=0.55)
    _shade(b, run, label=None)
    b.set(ylabel="prefix matching", ylim=(0, 1), title="prefix matching of every head "
          "(colour: layer; bold: induction heads)")
    for ax in (a, b):
        _tokens_axis(ax, tokens_per_step(run))
    _legend_outside(b, ncol=1 if pm.shape[1] * pm.shape[2] <= 16 else 2)
    return fig


def smooth_linear_ends(y, sigma_points):
    """y convolved with a Gaussian of `sigma_points` samples, its ends extended by odd
    reflection, so that a straight line stays straight up to its ends (edge padding would
    flatten the ends, and their derivative with them)."""
    y = np.asarray(y, np.float64)
    r = min(int(np.ceil(4 * sigma_points)), len(y) - 1)
    if sigma_points <= 0 or r < 1:
        return y
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_points) ** 2)
    return np.convolve(np.pad(y, r, mode="reflect", reflect_type="odd"), k / k.sum(),
                       mode="valid")


def _metrics_series(metrics, key):
    rows = [(r["step"], r[key]) for r in metrics if r.get(key) is not None and r["step"] > 0]
    if not rows:
        return np.zeros(0), np.zeros(0)
    s, v = (np.asarray(x, np.float64) for x in zip(*rows))
    return s, v


def held_out_series(run: dict, metrics) -> tuple[np.ndarray, np.ndarray]:
    """(steps, held-out loss) of a run past step 0: from its metrics.jsonl records, else from
    what its scores.json keeps of them ("eval_loss": {"steps", "loss"}), for an analysis
    whose run folder is not at hand."""
    s, v = _metrics_series(metrics or [], "eval_loss")
    saved = run.get("eval_loss")
    if not len(s) and isinstance(saved, dict) and saved.get("steps"):
        rows = [(a, b) for a, b in zip(saved["steps"], saved["loss"]) if a > 0 and b is not None]
        if rows:
            s, v = (np.asarray(x, np.float64) for x in zip(*rows))
    return s, v


def loss_fall_rate(steps, loss, smooth: float = 0.15, grid: int = 256):
    """(steps, -dLoss/d ln step) of a loss series on an even grid in ln step, smoothed with a
    Gaussian of `smooth` in ln step (the held-out loss is evaluated every few hundred steps;
    the rate of its raw differences is noise)."""
    steps, loss = np.asarray(steps, np.float64), np.asarray(loss, np.float64)
    keep = steps > 0
    steps, loss = steps[keep], loss[keep]
    if len(steps) < 3:
        return np.zeros(0), np.zeros(0)
    x = np.log(steps)
    xg = np.linspace(x[0], x[-1], grid)
    dx = xg[1] - xg[0]
    yg = smooth_linear_ends(np.interp(xg, x, loss), smooth / dx)
    return np.exp(xg), -np.gradient(yg, dx)


def plot_loss(result, metrics: dict, names=None):
    """The training and held-out loss of some runs (default: 1L beside 2L, else up to four)
    against log tokens, each column with the other runs' held-out loss faint behind it; and
    below them the held-out loss's rate of fall per unit of ln step: the bump is the rise of
    that rate in the phase change (shaded). A run with no window of its own shows 2L's dashed,
    the span the claims compare it over.

    metrics: {name: the run's metrics.jsonl records (workdir.read_metrics)}."""
    plt = pyplot()
    runs = result["runs"]
    if names is None:
        names = [n for n in ("1l", "2l") if n in runs] or list(runs)[:4]
    ref = runs.get("2l")
    ref_w = window_tokens(ref) if ref is not None else None
    fig, axes = plt.subplots(2, len(names), figsize=(5.2 * len(names) + 1, 6.4),
                             sharex=True, sharey="row", squeeze=False, layout="constrained")
    held = {n: held_out_series(runs[n], metrics.get(n, [])) for n in names}
    starts = [runs[n]["phase_change"]["start_step"] for n in names
              if runs[n]["phase_change"].get("detected")]
    # the y range: from the lowest loss to the highest after the early fall (a third of the
    # first window's start, else the last two thirds of ln step), where the bump is
    after = min(starts) / 3 if starts else None
    hi, lo = [], []
    for s, l in held.values():
        if len(s):
            cut = after if after else np.exp(np.log(s[0]) + (np.log(s[-1]) - np.log(s[0])) / 3)
            hi.append(np.max(l[s >= cut]) if (s >= cut).any() else np.max(l))
            lo.append(np.min(l))
    for j, name in enumerate(names):
        run, top, bottom = runs[name], axes[0, j], axes[1, j]
        per = tokens_per_step(run)
        for other in names:
            if other != name and len(held[other][0]):
                top.plot(held[other][0] * per, held[other][1], "-", color="0.75", lw=1,
                         label=f"{other}: held-out")
        st, tl = _metrics_series(metrics.get(name, []), "train_loss")
        se, el = held[name]
        top.plot(st * per, tl, color="C0", alpha=0.3, lw=0.6, label=f"{name}: training")
        top.plot(se * per, el, "o-", ms=2.5, color="C0", label=f"{name}: held-out")
        fs, rate = loss_fall_rate(se, el)
        bottom.plot(fs * per, rate, color="C0", label=name)
        bottom.axhline(0, color="0.5", lw=0.5)
        for ax in (top, bottom):
            _shade(ax, run, label="phase change" if ax is top else None)
            if ref_w is not None and name != "2l" and not run["phase_change"].get("detected"):
                for k, t in enumerate(ref_w):  # 2l's window, at the same step
                    ax.axvline(t / tokens_per_step(ref) * per, color="C1", ls="--", lw=1,
                               label="2l's window" if ax is top and k == 0 else None)
        top.set(title=f"{name}: loss", ylabel="loss (nats)" if j == 0 else None)
        bottom.set(ylabel="-dLoss / d ln(step)  (nats)" if j == 0 else None,
                   title=f"{name}: held-out loss, rate of fall per ln step")
        if len(se) > 1 and se[-1] > se[0]:
            top.set_xlim(se[0] * per, se[-1] * per)
        _tokens_axis(top, per, log=True)
        _tokens_axis(bottom, per, log=True, steps_on_top=False)
        top.legend(fontsize=7)
    if hi and max(hi) > min(lo):
        top_y, low_y = max(hi), min(lo)
        axes[0, 0].set_ylim(low_y - 0.05 * (top_y - low_y), top_y + 0.05 * (top_y - low_y))
    return fig


def _log_index_grid(raw_NT, n_points: int = 48, smooth: float = 0.1):
    """Loss by context index [N, T] resampled on log-spaced indices and smoothed in ln(i)
    (per-index noise would swamp the derivative): (indices, loss, dLoss/d ln i)."""
    raw = np.asarray(raw_NT, np.float64)
    T = raw.shape[1]
    idx = np.unique(np.geomspace(1, T, n_points).round().astype(int))
    lg = np.log(idx)
    fine = np.linspace(0, np.log(T), 256)
    interp = np.stack([np.interp(fine, np.log(np.arange(1, T + 1)), r) for r in raw])
    sm = np.stack([smooth_linear_ends(r, smooth / (fine[1] - fine[0])) for r in interp])
    loss = np.stack([np.interp(lg, fine, r) for r in sm])
    deriv = np.stack([np.interp(lg, fine, np.gradient(r, fine)) for r in sm])
    return idx, loss, deriv


def plot_loss_heatmap(run: dict):
    """Loss by context index over (training tokens, log index), and its derivative
    dLoss / d ln(i), each snapshot drawn at its own tokens; the phase change's edges dashed."""
    plt = pyplot()
    idx, loss, deriv = _log_index_grid(run["loss_by_position"])
    tokens = np.asarray(run["tokens"], np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.0), layout="constrained")
    m = float(np.nanpercentile(np.abs(deriv), 99)) or 1.0
    for ax, z, title, cmap, kw in (
            (axes[0], loss, "loss (nats)", "viridis", {}),
            (axes[1], deriv, "dLoss / d ln(i)", "RdBu_r", dict(vmin=-m, vmax=m))):
        im = ax.pcolormesh(tokens, idx, z.T, shading="nearest", cmap=cmap, **kw)
        ax.set_yscale("log")
        ax.set(ylabel="context index i", title=f"{run['name']}: {title}")
        w = window_tokens(run)
        if w is not None:
            for t in w:
                ax.axvline(t, color="w" if cmap == "viridis" else "k", ls="--", lw=1)
        _tokens_axis(ax, tokens_per_step(run))
        fig.colorbar(im, ax=ax)
    return fig


def pivot_label(traj: dict) -> str:
    """What the analysis says of a trajectory at its phase change, in a word or two: its
    "pivot" (stats.pca_pivot's dict: pivots, no pivot, unmeasurable), "" without one (no
    phase change, or an analysis that predates the pivot)."""
    p = traj.get("pivot")
    if not isinstance(p, dict):
        return ""
    return {True: "pivots", False: "no pivot"}.get(p.get("pivot"), "pivot unmeasurable")


def _at_step(steps, P, s):
    """The trajectory's point at step s, linear in steps between snapshots (as the pivot is
    measured)."""
    return np.array([np.interp(s, steps, P[:, k]) for k in range(P.shape[1])])


def plot_pca(pca: dict, runs: dict | None = None):
    """Every run's trajectory in the first two principal components of per-token losses, the
    phase change's span drawn thick between its edge markers (runs: the analysis's runs, for
    their windows; the PCA's own steps otherwise carry none). Where the analysis judged a
    pivot, the legend says its verdict and the two chords it compared (equal spans of steps
    before and after the fall's onset) are drawn dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    chords = False
    for i, (name, traj) in enumerate(pca["trajectories"].items()):
        P = np.asarray(traj["points"], np.float64)
        steps = np.asarray(traj["steps"], np.float64)
        verdict = pivot_label(traj)
        ax.plot(P[:, 0], P[:, 1], "-o", ms=2, lw=1, color=f"C{i}",
                label=f"{name}: {verdict}" if verdict else name)
        ax.plot(*P[0], "k^", ms=6)
        pc = (runs or {}).get(name, {}).get("phase_change", {})
        if pc.get("detected"):
            lns, x = np.log(np.maximum(steps, 1)), []
            for s in (pc["start_step"], pc["end_step"]):
                x.append(np.array([np.interp(np.log(max(s, 1)), lns, P[:, k]) for k in (0, 1)]))
            inside = (steps >= pc["start_step"]) & (steps <= pc["end_step"])
            seg = np.vstack([x[0], P[inside], x[1]])
            ax.plot(seg[:, 0], seg[:, 1], "-", lw=4, color=f"C{i}", alpha=0.55)
            ax.plot(*x[0], "o", mfc="w", mec=f"C{i}", ms=8, mew=2)
            ax.plot(*x[1], "s", mfc="w", mec=f"C{i}", ms=8, mew=2)
            p = traj.get("pivot")
            if isinstance(p, dict) and p.get("inside") is not None:
                corner = min(pc.get("onset_step") or pc["start_step"], pc["start_step"])
                end = pc["end_step"]
                lo = max(corner - (end - corner), float(steps[0]))
                c = np.stack([_at_step(steps, P[:, :2], s) for s in (lo, corner, end)])
                ax.plot(c[:, 0], c[:, 1], "--", color="k", lw=0.9, alpha=0.8,
                        label=None if chords else "the chords the pivot compares")
                chords = True
    ev = pca["explained"]
    ax.set_xlabel(f"PC1 ({ev[0]:.0%} of variance)" if ev else "PC1")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%} of variance)" if len(ev) > 1 else "PC2")
    ax.set_title("per-token loss PCA (▲ first snapshot; thick: phase change, "
                 "○ its start, □ its end)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: labels[k].startswith("the chords"))
    if handles:
        ax.legend([handles[k] for k in order], [labels[k] for k in order], fontsize=8,
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


# ----------------------------------------------------------------------------- argument 2

PAIRS = (("1l", "1l-smear"), ("2l", "2l-smear"))


def plot_coperturbation(result):
    """Each vanilla model beside its smeared-key twin: the ICL score against tokens, each
    one's phase change shaded; None without such a pair."""
    runs = result["runs"]
    pairs = [p for p in PAIRS if p[0] in runs and p[1] in runs]
    if not pairs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.0), squeeze=False,
                             layout="constrained")
    for ax, pair in zip(axes[0], pairs):
        for i, name in enumerate(pair):
            run = runs[name]
            ax.plot(run["tokens"], run["icl_score"], "-", color=f"C{i}", label=name)
            _shade(ax, run, color=f"C{i}", alpha=0.18,
                   label=f"{name}'s phase change" if run["phase_change"].get("detected")
                   else None)
        ax.axhline(0, color="0.5", lw=0.5)
        ax.set(ylabel="ICL score (nats)", title=f"{pair[0]} and smeared keys")
        _tokens_axis(ax, tokens_per_step(runs[pair[0]]))
        ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- argument 3

def plot_ablation(run: dict):
    """Each head's attribution to in-context learning (ICL ablated - ICL clean) against tokens,
    induction heads bold, the phase change shaded; and the last snapshot's as bars."""
    plt = pyplot()
    abl = np.asarray(run["ablation_icl"], np.float64)  # [N, L, H]
    tokens = np.asarray(run["tokens"], np.float64)
    L, H = abl.shape[1:]
    ind = _induction(run)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.0), width_ratios=(2, 1),
                               layout="constrained")
    for layer in range(L):
        for h in range(H):
            bold = (layer, h) in ind
            a.plot(tokens, abl[:, layer, h], color=f"C{layer}", lw=2.2 if bold else 0.8,
                   alpha=1.0 if bold else 0.55,
                   label=f"L{layer}H{h}" + (" (induction)" if bold else ""))
    _shade(a, run, label=None)
    a.axhline(0, color="k", lw=0.5)
    a.set(ylabel="ICL(ablated) - ICL(clean)  (nats)",
          title=f"{run['name']}: each head's attribution to in-context learning")
    _tokens_axis(a, tokens_per_step(run))
    if L * H <= 16:
        a.legend(fontsize=7, ncol=2)
    names = _head_names(L, H)
    colors = ["C3" if (l, h) in ind else "C0" for l in range(L) for h in range(H)]
    b.barh(names[::-1], abl[-1].ravel()[::-1], color=colors[::-1])
    b.axvline(0, color="k", lw=0.5)
    b.set(xlabel="nats", title=f"at step {int(run['steps'][-1]):,} (red: induction heads)")
    b.tick_params(axis="y", labelsize=7)
    return fig


# ----------------------------------------------------------------------------- argument 5

def plot_head_scores(run: dict):
    """Previous-token attention and the copying score (weights) of every head against tokens:
    the two halves of the induction circuit beside the prefix matching of plot_icl."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.0), layout="constrained")
    tokens = np.asarray(run["tokens"], np.float64)
    ind = _induction(run)
    for ax, key, title, ylim in (
            (axes[0], "previous_token", "previous-token attention", (0, 1)),
            (axes[1], "copying", "copying score (OV circuit's eigenvalues)", (-1, 1))):
        v = np.asarray(run[key], np.float64)
        plot_heads(ax, tokens, v, ind, bold_lw=2, faint_alpha=0.6)
        _shade(ax, run, label=None)
        ax.set(ylim=ylim, ylabel=title, title=f"{run['name']}: {title} of every head")
        _tokens_axis(ax, tokens_per_step(run))
    axes[1].axhline(0, color="k", lw=0.5)
    if np.prod(np.asarray(run["previous_token"]).shape[1:]) <= 16:
        _legend_outside(axes[1])
    return fig


def place_labels(ax, xy, labels, fontsize=7):
    """Annotates the points xy [n, 2] with labels, each at the nearest offset (on a grid of
    offsets up to ~90 points away) where its box stays inside the axes and overlaps no label
    already placed and no point: crowded heads (a layer's heads all near 0 prefix matching)
    stay readable, a far label joined to its point by a line. The axes' limits and position
    must be final. Returns the annotations."""
    from matplotlib.transforms import Bbox
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    xy = np.asarray(xy, np.float64)
    pts = ax.transData.transform(xy)
    px_per_pt = fig.dpi / 72
    offsets = sorted(((dx, dy) for dx in range(-90, 91, 6) for dy in range(-60, 61, 5)
                      if (dx, dy) != (0, 0)),
                     key=lambda d: (np.hypot(*d), d[0] < 0, d[1] < 0))
    frame = ax.get_window_extent(renderer)
    placed, out = [], []

    def free(box):
        return (frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0
                and box.y1 <= frame.y1 and not any(box.overlaps(p) for p in placed)
                and not any(box.x0 - 3 <= px <= box.x1 + 3 and box.y0 - 3 <= py <= box.y1 + 3
                            for px, py in pts))

    for (x, y), (px, py), label in zip(xy, pts, labels):
        probe = ax.text(x, y, label, fontsize=fontsize)
        w, h = probe.get_window_extent(renderer).size
        probe.remove()
        choice = offsets[0]
        for dx, dy in offsets:
            box = Bbox.from_bounds(px + dx * px_per_pt - (w if dx < 0 else 0),
                                   py + dy * px_per_pt - (h if dy < 0 else 0), w, h)
            if free(box):
                choice = (dx, dy)
                break
        else:  # nowhere free: the nearest offset
            dx, dy = choice
            box = Bbox.from_bounds(px + dx * px_per_pt, py + dy * px_per_pt, w, h)
        dx, dy = choice
        out.append(ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points",
                               fontsize=fontsize, ha="right" if dx < 0 else "left",
                               va="top" if dy < 0 else "bottom",
                               arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5")
                               if np.hypot(dx, dy) > 15 else None))
        placed.append(box)
    return out


def plot_copying_vs_prefix(run: dict, snapshot: int = -1):
    """Copying (weights) against prefix matching, every head, at one snapshot; the induction
    thresholds dashed."""
    plt = pyplot()
    pm = np.asarray(run["prefix_matching"], np.float64)[snapshot]
    cp = np.asarray(run["copying"], np.float64)[snapshot]
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    # a fixed layout: the labels are placed against the axes as they will be drawn
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.92)
    for layer in range(pm.shape[0]):
        ax.scatter(pm[layer], cp[layer], color=f"C{layer}", label=f"layer {layer}", zorder=3)
    t = run.get("thresholds", {})
    if t.get("prefix_matching") is not None:
        ax.axvline(t["prefix_matching"], color="C3", ls="--", lw=0.8,
                   label="induction thresholds")
    ax.axhline(t.get("copying", 0.0), color="C3" if "copying" in t else "k", ls="--", lw=0.8)
    ax.set(xlim=(-0.05, 1.05), ylim=(-1.1, 1.1), xlabel="prefix matching",
           ylabel="copying (eigenvalues of the OV circuit)",
           title=f"{run['name']}: every head at step {int(run['steps'][snapshot]):,}")
    ax.legend(fontsize=8, loc="lower right")
    place_labels(ax, np.stack([pm.ravel(), cp.ravel()], 1),
                 [f"L{l}H{h}" for l in range(pm.shape[0]) for h in range(pm.shape[1])])
    return fig


def plot_composition(run: dict, snapshot: int = -1):
    """Q-, K- and V-composition (the Framework paper's) from every earlier-layer head (rows)
    into every later-layer head (columns), at one snapshot; None for a one-layer model."""
    comp = run.get("composition")
    pm = np.asarray(run["prefix_matching"])
    L, H = pm.shape[1:]
    if not comp or L < 2:
        return None
    plt = pyplot()
    rows = _head_names(L - 1, H)  # layers 0..L-2
    cols = [f"L{l}H{h}" for l in range(1, L) for h in range(H)]
    fig, axes = plt.subplots(1, 3, figsize=(4.3 * 3 + 1, 0.42 * len(rows) + 2.8),
                             layout="constrained")
    vmax = max(float(np.nanmax(np.asarray(comp[k], np.float64)[snapshot])) for k in "qkv")
    for ax, kind in zip(axes, "qkv"):
        c = np.asarray(comp[kind], np.float64)[snapshot]  # [L1, H1, L2, H2]
        m = np.full((len(rows), len(cols)), np.nan)
        for l1 in range(L - 1):
            for h1 in range(H):
                for l2 in range(l1 + 1, L):
                    for h2 in range(H):
                        m[l1 * H + h1, (l2 - 1) * H + h2] = c[l1, h1, l2, h2]
        im = ax.imshow(m, cmap="Purples", vmin=0, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v) and len(rows) * len(cols) <= 64:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if v > 0.6 * vmax else "k")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set(title=f"{kind.upper()}-composition", xlabel="later head (reads)",
               ylabel="earlier head (writes)")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="composition score")
    fig.suptitle(f"{run['name']}: composition at step {int(run['steps'][snapshot]):,}")
    return fig


def plot_attention(pattern_TS, title: str = "attention"):
    """One head's attention pattern [T, S] (e.g. on a repeated sequence)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
    im = ax.imshow(np.asarray(pattern_TS), cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.colorbar(im, ax=ax, label="attention", shrink=0.85)
    return fig


def strongest_prefix_matching_head(run: dict) -> tuple[int, int]:
    """(layer, head) with the highest prefix-matching score at the last snapshot."""
    pm = np.asarray(run["prefix_matching"][-1])
    l, h = np.unravel_index(np.argmax(pm), pm.shape)
    return int(l), int(h)


# ----------------------------------------------------------------------------- the LLC

def plot_llc(steps, llc, llc_std, icl_score, phase_change=None, title: str = ""):
    """A figure of the LLC across training (mean +- std over chains) beside the ICL score,
    the phase change (analysis.detect_phase_change's dict) shaded in both."""
    plt = pyplot()
    steps, llc, llc_std = (np.asarray(x, np.float64) for x in (steps, llc, llc_std))
    fig, (ax_llc, ax_icl) = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    # step 0 has no place on a log axis; the shared x axis is log when steps span decades
    log = steps.size > 1 and (steps > 0).any() and steps[steps > 0].max() / max(
        steps[steps > 0].min(), 1) >= 30
    keep = steps > 0 if log else np.ones_like(steps, bool)
    ax_llc.plot(steps[keep], llc[keep], "o-", ms=3, color="C0")
    ax_llc.fill_between(steps[keep], (llc - llc_std)[keep], (llc + llc_std)[keep],
                        color="C0", alpha=0.25, lw=0)
    ax_llc.set(xlabel="training step", ylabel="local learning coefficient", title="LLC")
    icl = np.asarray(icl_score, np.float64)
    scored = keep & np.isfinite(icl)  # the ICL score may exist only at evaluation steps
    ax_icl.plot(steps[scored], icl[scored], "o-", ms=3, color="C1")
    ax_icl.set(xlabel="training step", ylabel="ICL score (nats)", title="in-context learning")
    for ax in (ax_llc, ax_icl):
        if log:
            ax.set_xscale("log")
        if phase_change and phase_change.get("detected"):
            ax.axvspan(phase_change["start_step"], phase_change["end_step"], color="0.6",
                       alpha=0.3, lw=0, label="phase change")
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
