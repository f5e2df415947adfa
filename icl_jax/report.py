"""Figures and the report page, drawn from an analysis (analysis.analyze's result).

Every plot_* takes one run's scores (what scores.json holds) or the shared PCA and
returns a matplotlib Figure, so a notebook can show one inline; write_report saves them
all and writes one self-contained report.html. Nothing here restores a snapshot or runs
the model: the attention figure reads the pattern the analysis kept of the last snapshot.
"""
from __future__ import annotations

import base64
import html
import io
import os
import sys

import numpy as np

from icl_jax import analysis, workdir as workdir_lib


# ----------------------------------------------------------------------------- figures

def pyplot():
    """matplotlib.pyplot, on the Agg backend (files, no display) unless in a notebook, whose
    inline backend must stay as it is."""
    import matplotlib
    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _steps_axis(ax, steps):
    ax.set_xlabel("training step")
    if np.max(steps) > 0:
        ax.set_xscale("symlog", linthresh=max(1, np.sort(steps)[min(1, len(steps) - 1)]))


def plot_icl(run: dict):
    """ICL score over training, the detected phase-change window shaded."""
    plt = pyplot()
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
    plt = pyplot()
    raw = np.asarray(run["loss_by_position"], np.float64)  # [N, T]
    # On an even grid in ln(i), smoothed: per-index noise would swamp the derivative.
    idx = np.unique(np.geomspace(1, raw.shape[1], 48).round().astype(int))
    lg = np.log(idx)
    fine = np.linspace(0, np.log(raw.shape[1]), 256)
    interp = np.stack([np.interp(fine, np.log(np.arange(1, raw.shape[1] + 1)), r) for r in raw])
    smooth = np.stack([analysis.gaussian_smooth(r, 0.1 / (fine[1] - fine[0])) for r in interp])
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
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    _per_head_lines(axes[0], run["steps"], run["prefix_matching"], "prefix matching")
    _per_head_lines(axes[1], run["steps"], run["previous_token"], "previous token", legend=True)
    fig.tight_layout()
    return fig


def plot_copying_vs_prefix(run: dict, snapshot: int = -1):
    """Copying (weights) against prefix matching, every head, at one snapshot."""
    plt = pyplot()
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    _per_head_lines(ax, run["steps"], run["ablation_icl"], "ablation: ICL(ablated) - ICL(clean)",
                    legend=True)
    ax.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    return fig


def plot_pca(pca: dict):
    """Every run's trajectory in the first two principal components of per-token losses."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, (name, traj) in enumerate(pca["trajectories"].items()):
        P = np.asarray(traj["points"])
        ax.plot(P[:, 0], P[:, 1], "-o", ms=2, color=f"C{i}",
                label=name if not traj.get("pivot") else
                f"{name} ({'pivots' if traj['pivot']['pivot'] else 'no pivot'} at its phase change)")
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
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(np.asarray(pattern_TS), cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def strongest_prefix_matching_head(run: dict) -> tuple[int, int]:
    """(layer, head) with the highest prefix-matching score at the last snapshot."""
    pm = np.asarray(run["prefix_matching"][-1])
    l, h = np.unravel_index(np.argmax(pm), pm.shape)
    return int(l), int(h)


def plot_family(result):
    """ICL score and best prefix matching (any layer) of every run over training (shaded:
    each run's phase change), all in one figure: reproduce's family.png."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (name, run) in enumerate(result["runs"].items()):
        steps = np.maximum(np.asarray(run["steps"]), 1)
        a.plot(steps, run["icl_score"], color=f"C{i}", label=name)
        pm = np.asarray(run["prefix_matching"])  # [snapshot, layer, head]
        b.plot(steps, pm.reshape(len(pm), -1).max(-1), color=f"C{i}", label=name)
        pc = run["phase_change"]
        if pc["detected"]:
            a.axvspan(pc["start_step"], pc["end_step"], color=f"C{i}", alpha=0.12)
    a.set(xscale="log", xlabel="training step", ylabel="ICL score (nats)",
          title="in-context learning score (shaded: phase change)")
    b.set(xscale="log", xlabel="training step", ylabel="prefix matching",
          title="best head's prefix matching (any layer)", ylim=(0, 1))
    a.legend(fontsize=8)
    fig.tight_layout()
    return fig


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


# ----------------------------------------------------------------------------- the page

def save_figure(fig, path):
    """The figure as a PNG at `path` (a local path or a bucket's URL)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    pyplot().close(fig)
    workdir_lib.write_bytes(path, buf.getvalue())


def _inline(t):
    t = html.escape(t)
    while "**" in t:
        t = t.replace("**", "<b>", 1).replace("**", "</b>", 1)
    return t.replace("`", "")


def markdown_html(markdown: str) -> str:
    """The little markdown results.md uses (headings, tables, bullets, **bold**) as HTML."""
    out, rows = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|- "):
                rows.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if rows:
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{_inline(c)}</{'th' if i == 0 else 'td'}>"
                                 for c in r) + "</tr>" for i, r in enumerate(rows)) + "</table>")
            rows = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level + 1}>{_inline(line.lstrip('#').strip())}</h{level + 1}>")
        elif line.startswith("- "):
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "".join(out)


def _fmt(v, spec="{:.3f}"):
    return "–" if v is None else spec.format(v)


def report_html(result, figs, preamble: str = "") -> str:
    """A self-contained page: `preamble` (markdown), a table of headline numbers and every
    figure in `figs` ((title, path relative to result["out"])), embedded."""
    rows = analysis.headline(result)
    cols = list(rows[0])
    cell = lambda v: html.escape(_fmt(v) if isinstance(v, float) else str(v))
    table = ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in cols) + "</tr>"
                       for r in rows) + "</table>")
    imgs = []
    for title, rel in figs:
        b64 = base64.b64encode((workdir_lib.path(result["out"]) / rel).read_bytes()).decode()
        imgs.append(f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(title)}'>"
                    f"<figcaption>{html.escape(title)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
             "font-size:90%}figure{display:inline-block;margin:1em}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>icl_jax analysis</title>"
            f"<style>{style}</style></head><body><h1>In-context learning and induction heads"
            f"</h1>{markdown_html(preamble)}{table}<p>Phase change: the rule of "
            f"icl_jax.analysis.detect_phase_change "
            f"(ln-step axis, smoothed; window where -dICL/d ln step exceeds 30% of its peak; "
            f"drop &ge; max(0.1 nats, 3 &times; the standard error of the difference) and "
            f"&ge; 40% of the score's fall around it, within a factor e of steps; not the early "
            f"transient, a fall from the first rise's top back to the initial score)."
            f"</p>{''.join(imgs)}</body></html>")


def write_report(result, preamble: str = "", figures=(), progress: bool = True) -> str:
    """Every figure of an analysis (analysis.analyze's result) as PNG, and report.html, once.

    preamble: markdown put at the top of the page (reproduce's results); figures: extra
    (title, file name, matplotlib Figure), saved in result["out"] and shown first. One run:
    its figures go to out; several: to out/<run name>/. Returns the page's path.
    """
    out = result["out"]
    single = len(result["runs"]) == 1
    figs = []  # (title, path relative to out)
    for title, fname, fig in figures:
        save_figure(fig, os.path.join(out, fname))
        figs.append((title, fname))
    for name, run in result["runs"].items():
        run_dir = out if single else os.path.join(out, name)
        last = result["last"][name]
        l, h = strongest_prefix_matching_head(run)
        makers = [("icl", lambda: plot_icl(run)), ("loss_heatmap", lambda: plot_loss_heatmap(run)),
                  ("head_scores", lambda: plot_head_scores(run)),
                  ("copying_vs_prefix", lambda: plot_copying_vs_prefix(run)),
                  ("ablation", lambda: plot_ablation(run)),
                  ("attention", lambda: plot_attention(
                      last.probe_attention_LHTS[l, h],
                      f"{name}: L{l}H{h} on a repeated sequence, step {last.step}"))]
        if run.get("llc") is not None:
            makers.append(("llc", lambda: plot_llc(
                run["steps"], run["llc"], run["llc_std"], run["icl_score"],
                run["phase_change"], f"{name}: local learning coefficient")))
        if run.get("llc_heads") is not None:  # analyze --llc heads: every head's wrLLC
            from icl_jax import head_llc_plot
            makers.append(("llc_heads", lambda: head_llc_plot.plot_head_llc(
                run, f"{name}: every head's refined LLC")))
        for fname, make in makers:
            path = os.path.join(run_dir, f"{fname}.png")
            save_figure(make(), path)
            figs.append((f"{name}: {fname.replace('_', ' ')}", os.path.relpath(path, out)))
    if result["pca"]["trajectories"]:
        save_figure(plot_pca(result["pca"]), os.path.join(out, "pca.png"))
        figs.append(("per-token loss PCA", "pca.png"))
    path = os.path.join(out, "report.html")
    workdir_lib.write_text(path, report_html(result, figs, preamble))
    if progress:
        print(f"wrote {path}", file=sys.stderr, flush=True)
    return path


def write_robustness(out, text: str, reports: dict) -> str:
    """<out>/report.html for several seeds: the robustness table (`text`, markdown) and a
    link to each seed's own report (`reports`: {seed: path relative to out})."""
    links = "".join(f'<li><a href="{html.escape(p)}">seed {s}</a></li>'
                    for s, p in reports.items())
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>icl_jax: claims over "
            "seeds</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;"
            "font-size:13px;vertical-align:top}</style></head><body>"
            + markdown_html(text) + "<h2>Each seed's report</h2><ul>" + links
            + "</ul></body></html>")
    path = os.path.join(str(out), "report.html")
    workdir_lib.write_text(path, page)
    return path
