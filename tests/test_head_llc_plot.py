"""The per-head LLC figure: K-means and its k, each head's role, and what the figure draws."""
import matplotlib
import numpy as np
import pytest

from icl_jax import head_llc_plot

matplotlib.use("Agg")


def blobs(centres, n=5, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([c + rng.normal(size=(n, len(c))) * spread for c in centres])
    return X, np.repeat(np.arange(len(centres)), n)


def same_partition(a, b):
    return len({(x, y) for x, y in zip(a, b)}) == len(set(a)) == len(set(b))


def test_kmeans_finds_separated_clusters_and_k_by_silhouette():
    X, truth = blobs([[0, 0, 0], [5, 5, 5], [0, 10, 0]])
    labels, inertia = head_llc_plot.kmeans(X, 3)
    assert same_partition(labels, truth)
    assert inertia == pytest.approx(sum(((X[truth == j] - X[truth == j].mean(0)) ** 2).sum()
                                        for j in range(3)))
    fit = head_llc_plot.cluster_curves(X)
    assert fit["k"] == 3 and same_partition(fit["labels"], truth)
    assert set(fit["silhouette"]) == {2, 3, 4, 5, 6}
    two, truth2 = blobs([[0, 0], [4, 4]], n=6)
    assert head_llc_plot.cluster_curves(two)["k"] == 2  # the rule can say 2, not always 3
    # clusters numbered by their last value, highest first; a snapshot with a NaN is dropped
    X[0, 0] = np.nan
    fit = head_llc_plot.cluster_curves(X)
    assert fit["k"] == 3 and fit["labels"][truth == 1][0] == 0
    assert head_llc_plot.cluster_curves(X[:2])["k"] == 1


def test_silhouette_by_hand():
    """Four points on a line, {0, 1} and {4, 6}: a(0) = 1, b(0) = (4 + 6) / 2 = 5, s = 0.8;
    a(1) = 1, b(1) = 4, s = 0.75; a(4) = 2, b(4) = 3.5, s = 3/7; a(6) = 2, b(6) = 5.5,
    s = 7/11."""
    X = np.array([[0.0], [1.0], [4.0], [6.0]])
    want = np.mean([0.8, 0.75, 1.5 / 3.5, 3.5 / 5.5])
    assert head_llc_plot.silhouette(X, [0, 0, 1, 1]) == pytest.approx(want)
    assert head_llc_plot.silhouette(X, [0, 1, 1, 1]) < want  # a worse split scores lower


def scores(L=2, H=3, S=6):
    steps = [0, 10, 100, 1000, 3000, 6000]
    prev = np.zeros((S, L, H))
    prev[-1, 0, 1] = 0.8
    cp = np.zeros((S, L, H))
    cp[-1, 1, 2] = 0.7  # a copying head
    cp[-1, 1, 0] = 0.9  # the induction head copies too: induction wins
    t = np.log1p(steps)[:, None]
    wr = np.concatenate([np.tile(5 + 0.1 * t, (1, H)), np.tile(1 + 2 * t, (1, H))], 1)
    wr = wr.reshape(S, L, H) + np.arange(H) * 0.01
    return {"steps": steps, "previous_token": prev.tolist(), "copying": cp.tolist(),
            "induction_heads": [[1, 0]], "phase_change": {"detected": True, "start_step": 900,
                                                          "end_step": 2500},
            "llc_heads": {"steps": steps, "wrllc": wr.tolist(),
                          "wrllc_se": np.full((S, L, H), 0.1).tolist(),
                          "drllc": {"pasted": (wr + 1).tolist(), "background": wr.tolist()}}}


def test_roles_from_the_last_snapshot():
    roles = head_llc_plot.head_roles(scores())
    assert roles.tolist() == [["other", "previous-token", "other"],
                              ["induction", "other", "copying"]]


def test_figure_colours_curves_by_cluster_and_names_roles():
    run = scores()
    fig = head_llc_plot.plot_head_llc(run, title="2l")
    curves, bars, sub = fig.axes[:3]
    lines = [l for l in curves.get_lines() if l.get_label().startswith("L")]
    assert len(lines) == 6
    # layer 0's flat curves and layer 1's rising ones are the two clusters, by colour
    colours = [matplotlib.colors.to_hex(l.get_color()) for l in lines]
    assert len(set(colours[:3])) == 1 and len(set(colours[3:])) == 1 and colours[0] != colours[3]
    assert lines[3].get_label() == "L1H0 (induction)" and lines[3].get_linestyle() == "-"
    assert lines[0].get_linestyle() == "--"
    np.testing.assert_allclose(lines[4].get_ydata(), np.asarray(run["llc_heads"]["wrllc"])[:, 1, 1])
    assert curves.get_xscale() == "log" and lines[0].get_xdata()[0] == 1  # step 0 at 1
    span = [p for p in curves.patches if p.get_label() == "phase change"]
    assert len(span) == 1
    to_data = curves.transData.inverted()
    ext = span[0].get_window_extent()
    lo, hi = to_data.transform((ext.x0, 0))[0], to_data.transform((ext.x1, 0))[0]
    assert lo == pytest.approx(900, rel=1e-3) and hi == pytest.approx(2500, rel=1e-3)
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert "L0H1  previous-token" in labels and "L1H2  copying" in labels
    assert sorted(t.get_text() for t in sub.get_legend().get_texts()) == ["background", "pasted"]
    run["phase_change"] = {"detected": False}
    del run["llc_heads"]["drllc"]
    fig = head_llc_plot.plot_head_llc(run)
    assert len(fig.axes) == 2 and not [p for p in fig.axes[0].patches
                                       if p.get_label() == "phase change"]
