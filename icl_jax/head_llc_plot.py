"""Every head's wrLLC over training, clustered, beside its role: the figure of Wang et al.
(2024, arXiv 2410.02984, Figure 1), drawn from a run's scores (analyze --llc heads).

Pure numpy and matplotlib, from what scores.json holds:
- kmeans / silhouette / cluster_curves: K-means of the heads' wrLLC curves (each head one
  vector of its wrLLC at the snapshots measured), k chosen by the largest mean silhouette
  over k = 2 .. min(6, heads - 1) (the smaller k on a tie);
- head_roles: each head's role from our own scores at the last snapshot;
- plot_head_llc(run_scores) -> matplotlib Figure.
"""
from __future__ import annotations

import sys

import numpy as np

from icl_jax.claims import THRESHOLDS

# a head's copying score (Re(sum eig) / sum |eig| of its OV circuit, -1..1) above this, and
# no other role, makes it a copying head. The paper names copying heads by positive
# eigenvalues without a cut-off; 0.5 (most of the OV circuit's eigenvalue mass real and
# positive) is ours
COPYING_ROLE = 0.5
ROLES = ("induction", "previous-token", "copying", "other")


def kmeans(X, k: int, seed: int = 0, restarts: int = 10, iters: int = 100):
    """(labels [n], inertia) of K-means on the rows of X [n, m]: k-means++ starts, the best
    of `restarts` by inertia (the summed squared distance to the assigned centre)."""
    X = np.asarray(X, np.float64)
    rng = np.random.default_rng(seed)
    best = (None, np.inf)
    for _ in range(restarts):
        centres = X[[rng.integers(len(X))]]
        while len(centres) < k:  # k-means++: the next start far from those chosen
            d2 = ((X[:, None] - centres[None]) ** 2).sum(-1).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(X), 1 / len(X))
            centres = np.vstack([centres, X[rng.choice(len(X), p=p)]])
        for _ in range(iters):
            labels = ((X[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.array([X[labels == j].mean(0) if (labels == j).any() else centres[j]
                            for j in range(k)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = float(((X - centres[labels]) ** 2).sum())
        if inertia < best[1] - 1e-12:
            best = (labels, inertia)
    return best


def silhouette(X, labels) -> float:
    """The mean silhouette (b - a) / max(a, b) of the rows of X under labels (a: mean
    distance to the rest of its cluster, b: to the nearest other cluster; 0 for a row alone
    in its cluster, as scikit-learn's)."""
    X, labels = np.asarray(X, np.float64), np.asarray(labels)
    dist = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    s = np.zeros(len(X))
    for i in range(len(X)):
        same = labels == labels[i]
        if same.sum() < 2:
            continue
        a = dist[i, same].sum() / (same.sum() - 1)
        b = min(dist[i, labels == c].mean() for c in set(labels.tolist()) - {labels[i]})
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def cluster_curves(curves, max_k: int = 6, seed: int = 0) -> dict:
    """K-means of curves [n heads, snapshots] with k chosen by the largest mean silhouette
    over k = 2 .. min(max_k, n - 1). Snapshots where any head's estimate is missing (a chain
    left out of every estimate: NaN) are dropped first. Fewer than 3 heads: one cluster.
    Returns {labels [n], k, silhouette {k: score}}."""
    X = np.asarray(curves, np.float64)
    X = X[:, np.isfinite(X).all(0)]
    n = len(X)
    if n < 3 or X.shape[1] == 0:
        return {"labels": np.zeros(n, int), "k": 1, "silhouette": {}}
    scores, fits = {}, {}
    for k in range(2, min(max_k, n - 1) + 1):
        fits[k] = kmeans(X, k, seed)[0]
        scores[k] = silhouette(X, fits[k])
    k = max(scores, key=lambda k: (scores[k], -k))
    # clusters numbered by their mean final value, highest first, so colours read alike
    labels = fits[k]
    order = np.argsort([-X[labels == j, -1].mean() for j in range(k)])
    return {"labels": np.argsort(order)[labels], "k": k, "silhouette": scores}


def head_roles(run_scores) -> np.ndarray:
    """[L, H] each head's role at the last snapshot, the first that fits of: "induction"
    (the paper's rule, analysis.induction_heads: prefix matching above
    eval.induction_prefix_threshold and copying above eval.induction_copying_threshold),
    "previous-token" (previous-token attention above claims.THRESHOLDS["previous_token"],
    0.5, as claim 4 requires of the induction head's partner), "copying" (copying score above
    COPYING_ROLE, ours), "other"."""
    prev = np.asarray(run_scores["previous_token"][-1], np.float64)
    cp = np.asarray(run_scores["copying"][-1], np.float64)
    roles = np.full(prev.shape, "other", dtype=object)
    roles[cp > COPYING_ROLE] = "copying"
    roles[prev > THRESHOLDS["previous_token"]] = "previous-token"
    for l, h in run_scores["induction_heads"]:
        roles[l, h] = "induction"
    return roles


def plot_head_llc(run_scores, title: str = "", max_k: int = 6):
    """The wrLLC of every head over training (log steps; step 0 drawn at 1), coloured by its
    K-means cluster (cluster_curves), solid in the last layer and dashed below it, the
    phase-change window shaded; beside it each head's last wrLLC (with its standard error)
    and its role (head_roles); with drLLC subsets, a third panel of every head's last drLLC
    on each. run_scores: one run's scores.json (or analyze's result["runs"][name]) with
    "llc_heads". Returns the matplotlib Figure."""
    import matplotlib
    if "ipykernel" not in sys.modules:  # files, no display; a notebook's inline backend stays
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view = run_scores["llc_heads"]
    steps = np.asarray(view["steps"], np.float64)
    wr = np.asarray(view["wrllc"], np.float64)  # [S, L, H]
    se = np.asarray(view["wrllc_se"], np.float64)
    S, L, H = wr.shape
    curves = wr.reshape(S, L * H).T
    fit = cluster_curves(curves, max_k)
    roles = head_roles(run_scores).ravel()
    names = [f"L{l}H{h}" for l in range(L) for h in range(H)]
    colours = plt.get_cmap("tab10")
    subsets = list(view.get("drllc") or {})

    fig, axes = plt.subplots(1, 3 if subsets else 2, figsize=(15 if subsets else 11, 4.2),
                             gridspec_kw={"width_ratios": [2.2, 1] + ([1] if subsets else [])})
    ax = axes[0]
    x = np.maximum(steps, 1)
    for i in range(L * H):
        ax.plot(x, curves[i], "o-" if i // H == L - 1 else "o--", ms=2.5, lw=1.2,
                color=colours(fit["labels"][i] % 10), label=f"{names[i]} ({roles[i]})")
        ax.annotate(names[i], (x[-1], curves[i, -1]), fontsize=7, xytext=(3, 0),
                    textcoords="offset points", va="center")
    pc = run_scores.get("phase_change") or {}
    if pc.get("detected"):
        for a in (ax,):
            a.axvspan(pc["start_step"], pc["end_step"], color="orange", alpha=0.2,
                      label="phase change")
    how = (f"K-means, k = {fit['k']} by silhouette" if fit["k"] > 1 else "one cluster")
    ax.set(xscale="log", xlabel="training step", ylabel="wrLLC",
           title=f"every head's weight-refined LLC ({how}; dashed: below the last layer)")
    ax.legend(fontsize=6, ncol=2, loc="upper left")

    ax = axes[1]
    order = np.lexsort((np.arange(L * H), fit["labels"]))
    y = np.arange(L * H)
    ax.barh(y, curves[order, -1], xerr=se.reshape(S, L * H)[-1, order],
            color=[colours(fit["labels"][i] % 10) for i in order])
    ax.set_yticks(y, [f"{names[i]}  {roles[i]}" for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="wrLLC", title=f"at step {int(steps[-1]):,}: cluster and role")

    if subsets:
        ax = axes[2]
        width = 0.8 / len(subsets)
        for j, name in enumerate(subsets):
            dr = np.asarray(view["drllc"][name], np.float64).reshape(S, L * H)[-1, order]
            ax.barh(y + (j - (len(subsets) - 1) / 2) * width, dr, height=width, label=name,
                    color=plt.get_cmap("Set2")(j))
        ax.set_yticks(y, [names[i] for i in order], fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="drLLC", title=f"data-refined, at step {int(steps[-1]):,}")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
