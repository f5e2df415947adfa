"""The report's figures and page: time axes in tokens or steps, never snapshot indices; labels
that do not collide; the claims table from claims.json of either shape; the page's order,
captions and setup; nothing fetched from a network."""
import html
import json
import os
import re

import matplotlib
import numpy as np
import pytest

from icl_jax import figures, report, workdir
from report_family import (PER_STEP, STEPS, fake_family, family_page,  # noqa: F401
                           new_claims, old_claims, rewritten)

matplotlib.use("Agg")
TOKENS = STEPS * PER_STEP


@pytest.fixture
def family(tmp_path):
    return fake_family(str(tmp_path))


def _time_axes(fig):
    """The axes of a figure that run along training (not colorbars, not secondary axes)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"
            and not _secondary(ax) and ax.get_xlabel()]


def _secondary(ax):
    return type(ax).__name__ == "SecondaryAxis"


def _x_of_artists(ax):
    xs = [np.asarray(line.get_xdata(), np.float64) for line in ax.get_lines()
          if len(line.get_xdata()) > 2]  # axvline/axhline have two points
    for coll in ax.collections:
        if isinstance(coll, matplotlib.collections.QuadMesh):
            xs.append(coll.get_coordinates()[0, :, 0])
    return xs


@pytest.mark.parametrize("make", ["family", "icl", "loss", "heatmap", "coperturbation",
                                  "ablation", "head_scores"])
def test_every_time_axis_is_tokens_or_steps_not_snapshot_indices(family, make):
    runs = family["runs"]
    metrics = {n: workdir.read_metrics(r["workdir"]) for n, r in runs.items()}
    fig = {"family": lambda: figures.plot_family(family),
           "icl": lambda: figures.plot_icl(runs["2l"]),
           "loss": lambda: figures.plot_loss(family, metrics),
           "heatmap": lambda: figures.plot_loss_heatmap(runs["2l"]),
           "coperturbation": lambda: figures.plot_coperturbation(family),
           "ablation": lambda: figures.plot_ablation(runs["2l"]),
           "head_scores": lambda: figures.plot_head_scores(runs["2l"])}[make]()
    timed = [ax for ax in _time_axes(fig) if "token" in ax.get_xlabel()
             or "step" in ax.get_xlabel()]
    assert timed, [ax.get_xlabel() for ax in fig.axes]
    for ax in _time_axes(fig):
        if ax.get_xlabel() in ("nats",):  # the ablation's bars at the last snapshot
            continue
        assert "token" in ax.get_xlabel() or "step" in ax.get_xlabel(), ax.get_xlabel()
        xs = _x_of_artists(ax)
        assert xs, (make, ax.get_title())
        for x in xs:
            # every series ends at the last snapshot's tokens (an index axis ends at N - 1,
            # a step axis at 4,000)
            assert TOKENS[-1] * 0.99 <= x.max() <= TOKENS[-1] * 1.1, (make, x.max())
    # the step is on a second axis above
    tops = [c for ax in fig.axes for c in ax.child_axes if _secondary(c)]
    assert tops and all(t.get_xlabel() == "training step" for t in tops)
    matplotlib.pyplot.close(fig)


def test_the_heatmap_draws_each_snapshot_at_its_own_tokens(family):
    run = family["runs"]["2l"]
    fig = figures.plot_loss_heatmap(run)
    mesh = [c for c in fig.axes[0].collections
            if isinstance(c, matplotlib.collections.QuadMesh)][0]
    edges = mesh.get_coordinates()[0, :, 0]  # cell edges: midpoints between snapshots
    centres = (edges[:-1] + edges[1:]) / 2
    # nearest shading puts each edge halfway between neighbours: the centres of the inner
    # cells are the snapshots' tokens, log-spaced early ones crowded at the left
    np.testing.assert_allclose(centres[1:-1], TOKENS[1:-1], rtol=0.35)
    assert np.all(np.diff(edges) > 0) and edges[0] <= 0 < edges[1]
    assert np.diff(edges)[1] < np.diff(edges)[-1] / 10  # not evenly spaced
    matplotlib.pyplot.close(fig)


def test_loss_fall_rate_is_the_slope_against_ln_step():
    """Brute force: a loss linear in ln(step) falls at its slope everywhere; a bump (a step
    down in ln step) shows as a peak at its centre."""
    s = np.arange(10, 5001, 10)
    x, rate = figures.loss_fall_rate(s, 5.0 - 0.3 * np.log(s))
    np.testing.assert_allclose(rate, 0.3, atol=1e-6)
    x, rate = figures.loss_fall_rate(s, 5.0 - 0.3 * np.log(s)
                                     - 0.5 / (1 + np.exp(-(np.log(s) - np.log(800)) / 0.1)))
    assert abs(np.log(x[np.argmax(rate)]) - np.log(800)) < 0.1 and rate.max() > 1.0


def _boxes(fig, texts):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    # the text's own box (an Annotation's extent includes the line to its point)
    return [matplotlib.text.Text.get_window_extent(t, r) for t in texts]


def test_copying_vs_prefix_labels_do_not_overlap(family):
    run = dict(family["runs"]["3l"])
    # every head crowded at one point but a hair apart: the labels must find room
    pm = np.zeros((len(STEPS), 3, 4)) + np.linspace(0, 0.03, 12).reshape(3, 4)
    cp = np.ones((len(STEPS), 3, 4)) * 0.9 + np.linspace(0, 0.03, 12).reshape(3, 4)
    run.update(prefix_matching=pm.tolist(), copying=cp.tolist())
    fig = figures.plot_copying_vs_prefix(run)
    ax = fig.axes[0]
    labels = [t for t in ax.texts if re.fullmatch(r"L\dH\d", t.get_text())]
    assert len(labels) == 12
    boxes = _boxes(fig, labels)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    matplotlib.pyplot.close(fig)


def test_the_attention_figures_title_is_clear_of_its_colorbar():
    fig = figures.plot_attention(np.eye(32), "2l-smear: L1H3 on a repeated random sequence, "
                                             "step 6,000 (a long title)")
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    title = fig.axes[0].title.get_window_extent(r)
    bar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert not title.overlaps(bar.get_tightbbox(r))
    assert fig.axes[0].title.get_window_extent(r).x0 >= 0
    matplotlib.pyplot.close(fig)


def test_the_pca_legend_names_the_models_and_no_turn_angle(family):
    fig = figures.plot_pca(family["pca"], family["runs"])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    models = [x for x in labels if x != "the chords the pivot compares"]
    assert [x.split(":")[0] for x in models] == list(family["runs"])
    assert not any("deg" in x or "°" in x for x in labels)
    # the window is marked on every run with one: a start (circle) and an end (square)
    ax = fig.axes[0]
    marks = [line for line in ax.get_lines() if line.get_marker() in ("o", "s")
             and line.get_markersize() == 8]
    detected = sum(r["phase_change"]["detected"] for r in family["runs"].values())
    assert detected >= 2 and len(marks) == 2 * detected
    matplotlib.pyplot.close(fig)


def test_the_pca_legend_gives_each_pivot_and_the_chords_it_compared(family):
    """The rewritten analysis: a "pivot" dict per trajectory with a phase change."""
    result = rewritten(family)
    fig = figures.plot_pca(result["pca"], result["runs"])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[-1] == "the chords the pivot compares"  # after the models, not among them
    detected = [n for n, r in result["runs"].items() if r["phase_change"]["detected"]]
    assert "2l" in detected and "2l-smear" in detected and "1l" not in detected
    assert sorted(labels) == sorted(
        [n if n not in detected else f"{n}: {'no pivot' if n == '2l-smear' else 'pivots'}"
         for n in result["runs"]] + ["the chords the pivot compares"])
    assert not any("deg" in x or "°" in x for x in labels)
    # the two chords: from the span before the onset to the onset, and on to the window's end
    chords = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(chords) == len(detected)
    run, traj = result["runs"]["2l"], result["pca"]["trajectories"]["2l"]
    pc, steps = run["phase_change"], np.asarray(traj["steps"], float)
    P = np.asarray(traj["points"])
    corner = pc["onset_step"]
    expect = [np.interp(s, steps, P[:, 0]) for s in (corner - (pc["end_step"] - corner),
                                                     corner, pc["end_step"])]
    assert any(np.allclose(c.get_xdata(), expect) for c in chords)
    matplotlib.pyplot.close(fig)
    # an unmeasurable pivot says so; today's analysis (a turn angle, no pivot) shows no angle
    result["pca"]["trajectories"]["3l"]["pivot"].update(pivot=None, inside=None)
    fig = figures.plot_pca(result["pca"], result["runs"])
    assert "3l: pivot unmeasurable" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    matplotlib.pyplot.close(fig)
    old = dict(family["pca"])
    old["trajectories"] = {n: {**{k: v for k, v in t.items() if k != "pivot"},
                               "turn_deg": 83.0}
                           for n, t in family["pca"]["trajectories"].items()}
    fig = figures.plot_pca(old, family["runs"])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(family["runs"])
    matplotlib.pyplot.close(fig)
    assert not any("83" in m for m in report.pca_measures(old))
    notes = report.pca_measures(result["pca"])
    assert "2l: pivots (NOTE 2l: turns 80 deg)" in notes
    assert "2l-smear: no pivot (NOTE 2l-smear: no motion)" in notes
    assert len(notes) == len(detected)


def test_the_icl_figure_marks_the_onset_of_the_fall(family):
    result = rewritten(family)
    run = result["runs"]["2l"]
    fig = figures.plot_icl(run)
    onset = run["phase_change"]["onset_step"] * PER_STEP
    dotted = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and dotted[0].get_xdata()[0] == pytest.approx(onset)
    matplotlib.pyplot.close(fig)
    older = {**run, "phase_change": {k: v for k, v in run["phase_change"].items()
                                     if k != "onset_step"}}
    fig = figures.plot_icl(older)  # no onset_step: no line
    assert not [line for line in fig.axes[0].get_lines() if line.get_linestyle() == ":"]
    matplotlib.pyplot.close(fig)


def test_the_loss_figure_reads_the_held_out_loss_scores_json_keeps(family):
    """No run folder at hand (metrics empty): the held-out loss from scores.json's eval_loss."""
    result = rewritten(family)
    fig = figures.plot_loss(result, {})
    rates = [ax for ax in fig.axes if "rate of fall" in ax.get_title()]
    assert len(rates) == 2
    for ax in rates:
        x = np.concatenate(_x_of_artists(ax))
        assert TOKENS[-1] * 0.99 <= x.max() <= TOKENS[-1] * 1.01 and x.min() > 0
    matplotlib.pyplot.close(fig)
    # and without either, nothing is drawn rather than something wrong
    fig = figures.plot_loss(family, {})
    assert not any(_x_of_artists(ax) for ax in fig.axes if "rate of fall" in ax.get_title())
    matplotlib.pyplot.close(fig)


def test_the_llc_figure_runs_along_training_steps():
    steps = np.array([0, 10, 100, 1000, 2000, 4000])
    fig = figures.plot_llc(steps, steps * 0.001 + 3, np.full(6, 0.1), -steps / 4000,
                           {"detected": True, "start_step": 900, "end_step": 1900})
    for ax in fig.axes:
        assert ax.get_xlabel() == "training step" and ax.get_xscale() == "log"
        xs = [line.get_xdata() for line in ax.get_lines()]
        assert xs and all(np.array_equal(x, steps[1:]) for x in xs)  # step 0 off a log axis
    matplotlib.pyplot.close(fig)


def test_the_composition_matrix_holds_the_scores(family):
    run = family["runs"]["2l"]
    fig = figures.plot_composition(run)
    k_ax = [ax for ax in fig.axes if ax.get_title() == "K-composition"][0]
    m = k_ax.get_images()[0].get_array()
    # rows: layer-0 heads; columns: layer-1 heads; L0H3 -> L1H2 the score we set
    assert m.shape == (4, 4)
    assert m[3, 2] == pytest.approx(np.asarray(run["composition"]["k"])[-1, 0, 3, 1, 2])
    assert [t.get_text() for t in k_ax.get_yticklabels()] == [f"L0H{h}" for h in range(4)]
    assert figures.plot_composition(family["runs"]["1l"]) is None
    matplotlib.pyplot.close(fig)


# ----------------------------------------------------------------------------- the page

def _claims_rows(page):
    t = re.search(r"<table id='claims-table'.*?</table>", page, re.S).group(0)
    return dict(re.findall(r"<tr id='claim-(\d)'>(.*?)</tr>", t, re.S))


def test_claims_table_from_todays_claims_json(family):
    claims = old_claims(family)
    page = report.claims_html(claims)
    rows = _claims_rows(page)
    assert list(rows) == ["1", "2", "3", "4"]
    # no quote in claims.json: the paper's sentence from the report's own list
    assert report.CLAIM_QUOTES["1"][:40] in rows["1"]
    # no "decisive": the failing check decides, else the unmeasurable one, else the first two
    assert "held-out loss falls faster" in rows["1"] and "ICL phase change" not in rows["1"]
    assert "largest other head" in rows["3"] and "summed attribution" not in rows["3"]
    assert "induction head in layer" in rows["4"] and "copying score of L1H2" in rows["4"]
    assert "K-composition above random" not in rows["4"]
    assert "not supported" in rows["1"] and "inconclusive" in rows["3"]
    # every check one click away: in a collapsed details per claim
    for n, claim in enumerate(claims["claims"], 1):
        d = html.unescape(re.search(rf"<details id='checks-{n}'>(.*?)</details>", page,
                                    re.S).group(1))
        assert all(c["check"] in d for c in claim["checks"])
        assert d.count("<tr") == len(claim["checks"]) + 1
    assert "why our threshold" not in page and "Across seeds" not in page


def test_claims_table_from_the_rewritten_claims_json(family):
    page = report.claims_html(new_claims(family))
    rows = _claims_rows(page)
    assert "QUOTE OF 1. Co-occurrence" in rows["1"]
    # "decisive" names the check, failing or not
    assert "no induction head" in rows["1"] and "held-out loss falls" not in rows["1"]
    assert "K-composition above random" in rows["4"]
    assert "BASIS 1.2" in page and "OURS 1." in page and "why our threshold" in page
    # the claim's argument links to its section of figures
    assert "href='#co-occurrence'>the paper's Argument 1" in rows["1"]
    assert "href='#mechanism'>the paper's Argument 5" in rows["4"]
    # the thresholds, each with why ours where claims.json says
    th = re.search(r"<details id='thresholds'>.*?</details>", page, re.S).group(0)
    assert "loss_bump" in th and "OURS-WHY loss_bump" in th and "pivot_deg" in th
    # robustness over seeds: per claim the seeds of each verdict, per seed the verdicts
    robust = page[page.index("Across seeds"):]
    per_claim, per_seed = re.findall(r"<table class='robust'>.*?</table>", robust, re.S)
    row1 = re.search(r"<tr><td class='claim'>1\. Co-occurrence</td>(.*?)</tr>", per_claim,
                     re.S).group(1)
    assert re.findall(r"<td>(\d+)", row1) == ["3", "6", "0", "1"]
    assert "(seeds 3, 4, 5, 6, 7, 8)" in row1 and "(seeds 9)" in row1
    seed3 = re.search(r"<tr><td>3</td>(.*?)</tr>", per_seed, re.S).group(1)
    assert seed3.count("verdict no") == 1 and seed3.count("verdict ok") == 3
    assert "1: 2l-smear: WHY SEED 3" in seed3
    assert "not run: ERROR OF SEED 9" in per_seed


def test_a_claims_json_of_other_members_is_left_out(family, tmp_path):
    stale = old_claims(family)
    (tmp_path / "claims.json").write_text(json.dumps(stale))
    assert report.load_claims(str(tmp_path), list(family["runs"])) == stale
    stale["rows"] = [{"model": "someone-else"}]
    (tmp_path / "claims.json").write_text(json.dumps(stale))
    assert report.load_claims(str(tmp_path), list(family["runs"])) is None


def test_the_page_opens_with_what_was_run_and_follows_the_papers_order(family_page):
    result, path = family_page
    page = open(path).read()
    order = [page.index(f"id='{a}'") for a in ("setup", "claims-table", "contents",
                                                 "co-occurrence", "co-perturbation",
                                                 "ablation", "mechanism", "appendix")]
    assert order == sorted(order)
    setup = page[page.index("id='setup'"):page.index("id='claims'")]
    for fact in ("quick", "not run here: the text, text-cpu, paper profiles", "seeds",
                 "d_model 32", "4,000 steps", "vocabulary", "4.0 minutes in all", "cpu",
                 "1l-smear: smeared keys"):
        assert fact in setup, fact
    assert "href='https://arxiv.org/abs/2209.11895'" in page
    # the claims from claims.json beside it, results.md collapsed at the end
    assert len(_claims_rows(page)) == 4
    assert page.index("RESULTS.MD TEXT") > page.index("id='appendix'")
    # every figure is captioned with what to look for and where the paper has it
    figs = re.findall(r"<figure.*?</figure>", page, re.S)
    assert len(figs) >= 20
    for f in figs:
        assert "What to look for:" in f and "In the paper:" in f
        assert "data:image/png;base64," in f
    # the contents link every section and the figures shown (not the collapsed ones)
    toc = re.search(r"<nav class='toc'.*?</nav>", page, re.S).group(0)
    for a in ("co-occurrence", "co-perturbation", "ablation", "mechanism", "fig-family",
              "fig-loss", "fig-pca", "fig-coperturbation", "fig-2l-ablation",
              "fig-2l-composition"):
        assert f"href='#{a}'" in toc, a
    assert "fig-1l-ablation" not in toc and "id='fig-1l-ablation'" in page
    # the figures are files too, one folder per member
    out = result["out"]
    for rel in ("family.png", "loss.png", "pca.png", "coperturbation.png", "2l/icl.png",
                "2l/loss_heatmap.png", "2l/ablation.png", "2l/composition.png",
                "2l/head_scores.png", "2l/copying_vs_prefix.png", "2l/attention.png",
                "1l-smear/attention.png"):
        assert (__import__("pathlib").Path(out) / rel).stat().st_size > 1000, rel


def test_the_page_is_self_contained(family_page):
    page = open(family_page[1]).read()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page)
    assert not re.search(r"<(img|link)[^>]*\b(src|href)\s*=\s*['\"](?!data:)", page)
    urls = set(re.findall(r"https?://[^'\" <>)]+", page))
    assert urls == {"https://arxiv.org/abs/2209.11895"}, urls
    assert "id=\"attention-view\"" in page  # the interactive view, inline


def test_the_untrained_score_is_said_and_the_analysis_note_printed(family, family_page):
    said = report.untrained_sentence(family)
    assert "At step 0 (untrained) the ICL score is -0.70 (1l), -0.70 (2l)" in said
    assert "NOTE" not in said
    page = open(family_page[1]).read()
    fam = re.search(r"<figure id='fig-family'.*?</figure>", page, re.S).group(0)
    assert "NOTE FROM THE ANALYSIS: why it is low." in fam and "At step 0" in fam


def test_the_analysis_account_of_the_untrained_score_is_said_once(family):
    """analysis.untrained_icl_note opens with the run's own score; six runs' notes differ in
    that number only, and the account after it is said once."""
    account = ("random logits vary more at early context indices, where attention averages "
               "fewer positions.")
    for name, run in family["runs"].items():
        run["untrained_icl_note"] = (f"At step 0 (untrained) the ICL score is "
                                     f"{run['icl_score'][0]:+.2f}: {account}")
    said = report.untrained_sentence(family)
    assert said.lower().count("random logits vary") == 1 and said.count("At step 0") == 1
    assert "Random logits vary more" in said and "-0.70 (2l-mlp)" in said


def test_one_run_gets_a_page_without_claims(tmp_path):
    result = fake_family(str(tmp_path), names=("2l",))
    page = open(report.write_report(result, progress=False)).read()
    assert "were not checked" in page and "claims-table" not in page
    assert "No vanilla and smeared-key pair" in page
    for name in ("icl", "loss_heatmap", "head_scores", "copying_vs_prefix", "ablation",
                 "attention", "composition", "loss", "pca"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
    assert not (tmp_path / "family.png").exists()


def test_a_second_report_of_the_same_analysis_reads_its_figures_back(tmp_path, monkeypatch):
    """Drawing is most of a report's time: a report of unchanged inputs reads its PNGs back
    (the same page, byte for byte); a changed score redraws every figure; a damaged PNG
    is drawn again, and only it."""
    result = fake_family(str(tmp_path), names=("2l",))
    drawn = []
    save = report.save_figure
    monkeypatch.setattr(report, "save_figure",
                        lambda fig, path: drawn.append(os.path.basename(path)) or save(fig, path))
    first = open(report.write_report(result, progress=False)).read()
    n = len(drawn)
    assert n >= 9 and (tmp_path / report.MANIFEST).exists()
    drawn.clear()
    assert open(report.write_report(result, progress=False)).read() == first
    assert drawn == []
    (tmp_path / "icl.png").write_bytes((tmp_path / "icl.png").read_bytes()[:100])  # torn
    assert open(report.write_report(result, progress=False)).read() == first
    assert drawn == ["icl.png"]
    drawn.clear()
    result["runs"]["2l"]["icl_score"][-1] += 0.25
    changed = open(report.write_report(result, progress=False)).read()
    assert len(drawn) == n and changed != first


def test_the_sweep_is_found_with_its_members_workdirs_as_given(family, tmp_path, monkeypatch):
    """sweep.json keeps the workdirs a sweep was given (relative, as `reproduce` passes
    runs/reproduce/2l); the runs' scores keep absolute ones."""
    monkeypatch.chdir(tmp_path.parent)
    rel = {n: os.path.relpath(r["workdir"]) for n, r in family["runs"].items()}
    (tmp_path / "sweep.json").write_text(json.dumps({
        "sweep": "configs/sweeps/quick.py",
        "members": {n: {"workdir": w, "wall_s": 30.0} for n, w in rel.items()}}))
    assert not any(os.path.isabs(w) for w in rel.values())
    found = report.load_sweep(str(tmp_path), {os.path.normpath(r["workdir"])
                                              for r in family["runs"].values()})
    assert found is not None and set(found["members"]) == set(family["runs"])
    assert report.load_sweep(str(tmp_path), {"/elsewhere/2l"}) is None


def test_a_rewritten_analysis_gets_the_same_page(tmp_path):
    """scores.json and claims.json of the statistics rewrite (pivot, onset, eval_loss,
    model; quote, argument, decisive, key, thresholds): the page shows what they add."""
    result = rewritten(fake_family(str(tmp_path), names=("1l", "2l", "1l-smear", "2l-smear")))
    (tmp_path / "claims.json").write_text(json.dumps(new_claims(result)))
    page = open(report.write_report(result, progress=False)).read()
    fig = re.search(r"<figure id='fig-pca'.*?</figure>", page, re.S).group(0)
    assert "2l: pivots (NOTE 2l: turns 80 deg)" in fig and "dashed" in fig
    assert "QUOTE OF 1. Co-occurrence" in page and "id='thresholds'" in page
    assert page.count("<table class='robust'>") == 2


def test_the_robustness_page_colours_the_verdicts_and_links_each_seed(tmp_path):
    text = "\n".join([
        "# Robustness: profile `quick`, seeds 0, 1, 2", "", "Each seed is one run.", "",
        "| claim | supported | not supported | inconclusive | not run |",
        "| --- | --- | --- | --- | --- |",
        "| 1. Co-occurrence | 1 | 1 (seeds 1) | 0 | 1 (seeds 2) |", "",
        "| seed | 1. Co-occurrence | what decided a verdict short of supported |",
        "| --- | --- | --- |", "| 0 | supported | - |", "| 1 | not supported | 1: WHY |",
        "| 2 | - | ERROR |"])
    path = report.write_robustness(tmp_path, text, {0: "s0/report.html", 1: "s1/report.html"})
    assert path == os.path.join(str(tmp_path), "report.html")
    page = open(path).read()
    assert "<span class='verdict ok'>supported</span>" in page
    assert "<span class='verdict no'>not supported</span>" in page
    assert "<td>1 (seeds 1)</td>" in page and "1: WHY" in page
    assert re.findall(r"<a href='(s\d/report.html)'>seed (\d)</a>", page) == [
        ("s0/report.html", "0"), ("s1/report.html", "1")]
    assert set(re.findall(r"https?://[^'\" <>)]+", page)) == {"https://arxiv.org/abs/2209.11895"}
    assert "<script" not in page
