"""The claims' verdicts on hand-made score sets (no training): the all-good family is
supported, and every way each claim can fail makes it "not supported" (or "inconclusive"
where something cannot be measured). Plus the measurements on curves whose answer is
known by construction, and a negative control from a real run's early snapshots."""
import json
import math
import os

import numpy as np
import pytest

from icl_jax import analysis, claims

STEPS = np.array([0, 1, 2, 4, 8, 16, 32, 63, 125] + list(range(250, 5001, 250)))
H = 4


def _sig(center, width=150.0):
    return 1 / (1 + np.exp(-(STEPS - center) / width))


def member(layers, drop_at=None, ind=None, prev=(0, 0), smear=False, mlp=False, seed=0,
           late_share=0.9):
    """One member's scores as analysis.analyze gives them (lists), with its metrics.

    drop_at: the step of the ICL phase change (None: a 1L-like plateau); ind: the induction
    head (layer, head), whose prefix matching rises, whose copying is positive and whose
    ablation carries `late_share` of the ICL gained, at drop_at; prev: the previous-token
    head, which K-composes into it (0.30, every other earlier head 0.125: chance).
    """
    rng = np.random.default_rng(seed)
    n, L = len(STEPS), layers
    rise = _sig(drop_at, drop_at / 15) if drop_at else np.zeros(n)
    # initialisation -0.3, the early transient to +1.05, the drop to -0.95 (as in
    # data.placement=uniform), noise 0.02 a snapshot, standard error 0.12
    icl = -0.3 + 1.35 * np.clip(STEPS / 200, 0, 1) - 2.0 * rise + rng.normal(0, 0.02, n)
    se = np.full(n, 0.12)
    pm = np.full((n, L, H), 0.05)
    prev_tok = np.full((n, L, H), 0.1)
    cp = np.full((n, L, H), -0.2)
    abl = np.full((n, L, H), 0.01)
    k = np.zeros((n, L, H, L, H))
    for l2 in range(1, L):
        k[:, :l2, :, l2, :] = 0.125
    prev_tok[:, prev[0], prev[1]] = 0.98
    if ind is not None:
        pm[:, ind[0], ind[1]] = 0.05 + 0.85 * rise
        cp[:, ind[0], ind[1]] = 0.9
        gained = np.maximum(1.05 - icl, 0)
        abl[:, ind[0], ind[1]] = late_share * gained * rise
        if ind[0] > prev[0]:
            k[:, prev[0], prev[1], ind[0], ind[1]] = 0.30
    # the PCA: creeping along PC1, a fast move along PC2 through the window
    lns = np.log(np.maximum(STEPS, 1))
    points = np.stack([0.2 * lns, 3.0 * rise], 1) + rng.normal(0, 0.003, (n, 2))
    ev = np.arange(0, 5001, 100)
    ev_loss = 4.0 - 0.15 * np.log1p(ev)  # the held-out loss, with a bump in the window
    if drop_at:
        ev_loss = ev_loss - 1.0 / (1 + np.exp(-(ev - drop_at) / (drop_at / 40)))
    run = {"steps": STEPS.tolist(), "tokens": (STEPS * 2048).tolist(), "icl_score": icl.tolist(),
           "icl_se": se.tolist(), "prefix_matching": pm.tolist(),
           "previous_token": prev_tok.tolist(), "copying": cp.tolist(),
           "ablation_icl": abl.tolist(), "composition": {"k": k.tolist()},
           "thresholds": {"prefix_matching": 0.3, "copying": 0.0},
           "model": {"d_model": 64, "n_heads": H, "d_head": 0, "mlp": mlp, "smear_keys": smear}}
    metrics = [{"step": int(s), "eval_loss": float(v)} for s, v in zip(ev, ev_loss)]
    return run, points, metrics


def finish(runs, points, metrics):
    """The result dict of analysis.analyze from the members' raw scores: phase change and
    induction heads by analysis's own functions."""
    out = {}
    for name, run in runs.items():
        run = dict(run)
        run["phase_change"] = analysis.detect_phase_change(run["steps"], run["icl_score"],
                                                           run["tokens"], icl_se=run["icl_se"])
        run["induction_heads"] = analysis.induction_heads(run["prefix_matching"][-1],
                                                          run["copying"][-1], 0.3, 0.0)
        run["name"] = name
        out[name] = run
    traj = {n: {"steps": runs[n]["steps"], "points": np.asarray(points[n]).tolist()}
            for n in runs}
    return {"runs": out, "pca": {"trajectories": traj}}, metrics


def good_family_spec():
    return {"1l": dict(layers=1),
            "2l": dict(layers=2, drop_at=2300, ind=(1, 2)),
            "3l": dict(layers=3, drop_at=2200, ind=(2, 0), prev=(1, 3)),
            "1l-smear": dict(layers=1, drop_at=1500, ind=(0, 1), prev=(0, 0), smear=True),
            "2l-smear": dict(layers=2, drop_at=800, ind=(0, 1), prev=(0, 0), smear=True),
            "2l-mlp": dict(layers=2, drop_at=2600, ind=(1, 0), prev=(0, 3), mlp=True)}


def good_family():
    runs, points, metrics = {}, {}, {}
    for i, (name, kw) in enumerate(good_family_spec().items()):
        runs[name], points[name], metrics[name] = member(seed=i, **kw)
    return runs, points, metrics


def verdicts(runs, points, metrics):
    result, metrics = finish(runs, points, metrics)
    rows, found = claims.check_claims(result, metrics)
    json.dumps({"rows": rows, "claims": found})  # claims.json must be writable
    return {c["claim"][0]: c for c in found}


def test_the_good_family_supports_every_claim():
    got = verdicts(*good_family())
    for c in got.values():
        assert c["verdict"] == "supported", c["evidence"]
        # what is shown beside a verdict without counting (2l-smear's ablation) passes too
        assert all(ch["status"] == "pass" or (ch["status"] == "shown"
                                              and ch["note"].startswith("pass;"))
                   for ch in c["checks"]), c["evidence"]
    # every check carries its number and its threshold
    assert all(ch["threshold"] is not None and ch["value"] is not None
               for c in got.values() for ch in c["checks"])


def _breaks(mutate, claim, expected="not supported"):
    runs, points, metrics = good_family()
    mutate(runs, points, metrics)
    c = verdicts(runs, points, metrics)[claim]
    assert c["verdict"] == expected, c["evidence"]
    return c


def _replace(runs, points, metrics, name, **kw):
    spec = {**good_family_spec()[name], **kw}
    runs[name], points[name], metrics[name] = member(seed=list(runs).index(name), **spec)


# ----------------------------------------------------------------------------- claim 1

def test_claim1_fails_when_the_mlp_member_has_no_phase_change():
    _breaks(lambda *a: _replace(*a, "2l-mlp", drop_at=None, ind=None), "1")


def test_claim1_fails_when_prefix_matching_rises_outside_the_window():
    def late_rise(runs, points, metrics):
        pm = np.asarray(runs["3l"]["prefix_matching"])
        pm[:, 2, 0] = 0.05 + 0.85 * _sig(4600, 100)
        runs["3l"]["prefix_matching"] = pm.tolist()
    _breaks(late_rise, "1")


def test_claim1_fails_without_a_loss_bump():
    def straight(runs, points, metrics):
        # the fixture's trend, steady in ln(step), without its bump
        metrics["2l"] = [{"step": r["step"], "eval_loss": 4.0 - 0.15 * np.log1p(r["step"])}
                         for r in metrics["2l"]]
    c = _breaks(straight, "1")
    bump = [ch for ch in c["checks"] if ch["member"] == "2l" and "loss" in ch["check"]][0]
    assert bump["status"] == "fail" and bump["value"] == pytest.approx(1.0, abs=0.05)


def test_a_loss_bump_that_cannot_be_measured_is_inconclusive_not_infinite():
    def sparse(runs, points, metrics):  # an evaluation every 1,000 steps: < 3 points before
        metrics["2l"] = [r for r in metrics["2l"] if r["step"] % 1000 == 0]
    c = _breaks(sparse, "1", "inconclusive")
    bump = [ch for ch in c["checks"] if ch["member"] == "2l" and "loss" in ch["check"]][0]
    assert bump["status"] == "unmeasurable" and bump["value"] is None


def test_claim1_fails_when_the_pca_trajectory_keeps_its_pace():
    def steady(runs, points, metrics):
        lns = np.log(np.maximum(STEPS, 1))
        points["2l"] = np.stack([0.3 * lns, 0.1 * lns], 1)
    _breaks(steady, "1")


@pytest.mark.parametrize("how", ["drop", "induction head", "pca", "loss bump"])
def test_claim1_fails_when_the_1l_control_shows_it(how):
    def control(runs, points, metrics):
        r = runs["1l"]
        if how == "drop":  # a fall over 2l's window
            icl = np.asarray(r["icl_score"]) - 1.6 * _sig(2300, 400)
            r["icl_score"] = icl.tolist()
        elif how == "induction head":
            pm, cp = np.asarray(r["prefix_matching"]), np.asarray(r["copying"])
            pm[-1, 0, 2], cp[-1, 0, 2] = 0.5, 0.5
            r["prefix_matching"], r["copying"] = pm.tolist(), cp.tolist()
        elif how == "pca":
            points["1l"] = np.asarray(points["2l"])
        else:  # 2l's held-out loss, bump included
            metrics["1l"] = [dict(r) for r in metrics["2l"]]
    c = _breaks(control, "1")
    assert any(ch["member"] == "1l" and ch["status"] == "fail" for ch in c["checks"])


@pytest.mark.parametrize("bump, expected", [(0.03, "supported"), (0.4, "not supported")])
def test_the_1l_control_weighs_its_bump_against_2ls(bump, expected):
    """A plateaued 1L whose loss wobbles over 2L's window: its rate inside over before can
    pass 1.5x (seeds 1 and 5-8 of the quick profile: 1.6-2.7x at ~0.03 nats per ln step,
    against 2L's ~0.7), but only a bump of at least a tenth of 2L's excess is the bump the
    claim is about. Both sides of that line are tried."""
    def small_bump(runs, points, metrics):
        ev = np.array([r["step"] for r in metrics["1l"]])
        loss = 3.0 - 0.02 * np.log1p(ev) - bump / (1 + np.exp(-(ev - 2300) / (2300 / 40)))
        metrics["1l"] = [{"step": int(s), "eval_loss": float(v)} for s, v in zip(ev, loss)]
    runs, points, metrics = good_family()
    small_bump(runs, points, metrics)
    c = verdicts(runs, points, metrics)["1"]
    check = [ch for ch in c["checks"] if ch["member"] == "1l" and "loss" in ch["check"]][0]
    assert check["value"] > 1.5  # the plain ratio would call both a bump
    assert c["verdict"] == expected, c["evidence"]
    assert check["status"] == ("pass" if expected == "supported" else "fail")
    assert "of 2l's" in check["note"]


# ----------------------------------------------------------------------------- claim 2

def test_claim2_fails_when_1l_smear_has_no_phase_change():
    _breaks(lambda *a: _replace(*a, "1l-smear", drop_at=None), "2")


def test_claim2_fails_when_1l_smear_has_no_induction_head():
    def no_head(runs, points, metrics):
        cp = np.asarray(runs["1l-smear"]["copying"])
        cp[:, 0, 1] = -0.5
        runs["1l-smear"]["copying"] = cp.tolist()
    _breaks(no_head, "2")


def test_claim2_fails_when_2l_smear_is_not_earlier():
    _breaks(lambda *a: _replace(*a, "2l-smear", drop_at=3000), "2")


def test_claim2_fails_when_2l_smear_has_no_phase_change():
    _breaks(lambda *a: _replace(*a, "2l-smear", drop_at=None, ind=None), "2")


def test_claim2_is_inconclusive_when_2l_has_no_window_to_compare_with():
    c = _breaks(lambda *a: _replace(*a, "2l", drop_at=None, ind=None), "2", "inconclusive")
    assert "2l has no phase change" in c["evidence"]


# ----------------------------------------------------------------------------- claim 3

def test_claim3_fails_when_the_induction_heads_carry_too_little():
    _breaks(lambda *a: _replace(*a, "2l", late_share=0.3), "3")


def test_2l_smear_is_shown_under_claim3_but_does_not_decide_it():
    """The paper's ablation argument is made on vanilla attention-only models; 2l-smear's
    attributions are shown beside the verdict: a second head of it carrying much is
    reported as a failed check marked "shown", and the verdict stands."""
    runs, points, metrics = good_family()
    abl = np.asarray(runs["2l-smear"]["ablation_icl"])
    abl[:, 1, 1] = 0.6 * abl.max(axis=(1, 2))
    runs["2l-smear"]["ablation_icl"] = abl.tolist()
    c = verdicts(runs, points, metrics)["3"]
    assert c["verdict"] == "supported", c["evidence"]
    shown = [ch for ch in c["checks"] if ch["member"] == "2l-smear"]
    assert shown and all(ch["status"] == "shown" for ch in shown)
    assert any(ch["note"].startswith("fail;") for ch in shown)


def test_claim3_fails_when_another_head_carries_much():
    def busy(runs, points, metrics):
        abl = np.asarray(runs["3l"]["ablation_icl"])
        abl[:, 0, 1] = 0.5 * abl[:, 2, 0]
        runs["3l"]["ablation_icl"] = abl.tolist()
    _breaks(busy, "3")


def test_claim3_fails_across_training_even_if_the_last_snapshot_passes():
    def early_weak(runs, points, metrics):
        abl = np.asarray(runs["2l"]["ablation_icl"])
        abl[-6:-1, 1, 2] *= 0.2  # five snapshots after the window where it carries little
        runs["2l"]["ablation_icl"] = abl.tolist()
    c = _breaks(early_weak, "3")
    last = [ch for ch in c["checks"] if ch["member"] == "2l" and "last snapshot" in ch["check"]]
    assert all(ch["status"] == "pass" for ch in last)


def test_claim3_fails_without_induction_heads():
    _breaks(lambda *a: _replace(*a, "3l", ind=None), "3")


def test_ablating_all_other_heads_together_is_not_the_test():
    """The old check: a family whose induction heads carry little cannot pass because
    ablating the background heads together 'removes' a negative share."""
    _breaks(lambda *a: _replace(*a, "2l", late_share=0.1), "3")


# ----------------------------------------------------------------------------- claim 4

def test_claim4_fails_with_a_layer0_induction_head():
    c = _breaks(lambda *a: _replace(*a, "2l", ind=(0, 1)), "4")
    assert "layer >= 1" in c["evidence"]


def test_claim4_fails_without_a_previous_token_head():
    def weak(runs, points, metrics):
        pt = np.asarray(runs["2l"]["previous_token"])
        pt[:, 0, 0] = 0.3
        runs["2l"]["previous_token"] = pt.tolist()
    _breaks(weak, "4")


def test_claim4_fails_when_another_head_composes_more():
    def other(runs, points, metrics):
        k = np.asarray(runs["2l"]["composition"]["k"])
        k[:, 0, 3, 1, 2] = 0.35
        runs["2l"]["composition"]["k"] = k.tolist()
    _breaks(other, "4")


def test_claim4_fails_when_composition_is_at_chance():
    def chance(runs, points, metrics):
        k = np.asarray(runs["2l"]["composition"]["k"])
        k[:, 0, 0, 1, 2] = 0.14  # largest, but inside random matrices' 0.125 + 3 x 0.007
        runs["2l"]["composition"]["k"] = k.tolist()
    c = _breaks(chance, "4")
    base = [ch for ch in c["checks"] if "random" in ch["check"]][0]
    assert base["status"] == "fail" and 0.13 < base["threshold"] < 0.16


def test_claim4_fails_when_the_induction_head_does_not_copy():
    def anti(runs, points, metrics):  # prefix matching without copying: no induction head
        cp = np.asarray(runs["2l"]["copying"])
        cp[:, 1, 2] = -0.4
        runs["2l"]["copying"] = cp.tolist()
    _breaks(anti, "4")


# ----------------------------------------------------------------------------- measurements

def test_k_composition_baseline_is_about_one_over_sqrt_d_model():
    mean, sd = claims.k_composition_baseline(64, 16)
    assert mean == pytest.approx(1 / math.sqrt(64), rel=0.05) and 0 < sd < 0.02
    assert claims.k_composition_baseline(64, 16) == (mean, sd)  # fixed seed


def _metrics(losses):
    return [{"step": s, "eval_loss": l} for s, l in enumerate(losses)]


def test_loss_bump_is_a_faster_fall_inside_the_window():
    """Per unit ln(step), against the span of equal ln width before the window: a loss
    falling steadily in ln(step) has ratio 1, with a bump inside the window well above."""
    steps = np.arange(1000)
    straight = 3 - 0.2 * np.log(np.maximum(steps, 1))
    bumped = straight - 0.5 * np.clip((steps - 400) / 200, 0, 1)
    assert claims.loss_bump(_metrics(straight), (400, 600))[0] == pytest.approx(1.0, abs=0.05)
    assert claims.loss_bump(_metrics(bumped), (400, 600))[0] > 1.5
    assert claims.loss_bump(_metrics(bumped)[:401:200], (400, 600))[0] is None
    # the span before is [400^2 / 600, 400] = [267, 400] in steps: a window opening early is
    # not compared with the first steps' steep fall
    early = 3 - 0.2 * np.log(np.maximum(steps, 1)) - 0.3 * np.clip((steps - 100) / 100, 0, 1)
    assert claims.loss_bump(_metrics(early), (100, 200))[0] > 1.5


def test_pca_speedup_separates_a_jump_from_a_steady_path():
    lns = np.log(np.maximum(STEPS, 1))
    steady = np.stack([lns, lns], 1)
    jump = steady + np.stack([np.zeros_like(lns), 5 * _sig(2300)], 1)
    assert claims.pca_speedup(steady, STEPS, (1800, 2900))[0] == pytest.approx(1.0, rel=0.05)
    assert claims.pca_speedup(jump, STEPS, (1800, 2900))[0] > 3


# ----------------------------------------------------------------------------- negative control

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "early_family.json")


def test_a_family_stopped_before_any_induction_head_supports_no_claim():
    """Scores of the quick profile's six members (seed 0) at steps 0-500, copied from a
    real run (tests/data/early_family.json, see its "source"): no head has formed yet."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    runs = fixture["runs"]
    for run in runs.values():
        run["phase_change"] = analysis.detect_phase_change(
            run["steps"], run["icl_score"], run["tokens"], icl_se=run["icl_se"])
    rows, found = claims.check_claims({"runs": runs, "pca": fixture["pca"]}, fixture["metrics"])
    assert all(r["induction heads"] == "none" for r in rows)
    for c in found:
        assert c["verdict"] != "supported", c


def test_claims_from_analyses_saved_elsewhere(trained_2l, tmp_path, capsys):
    """Members analysed on another machine (a GPU loan) come back as <analysis>/<member>/
    scores.json beside a run folder without snapshots, their recorded workdir missing here:
    `icl-jax claims --scores` gives the same rows and verdicts as the analysis it came from,
    and refuses a member given twice or folders with no scores, naming them."""
    import shutil
    from icl_jax import cli
    _, workdir = trained_2l
    result = analysis.analyze([str(workdir)], out=str(tmp_path / "here"), progress=False)
    rows, found = claims.check_claims(result)
    back = tmp_path / "back"  # what a tarball of the other machine's folder holds
    shutil.copytree(workdir, back / "2l", ignore=shutil.ignore_patterns("snapshots"))
    (back / "analysis" / "2l").mkdir(parents=True)  # as analyze of several runs lays it out
    shutil.copy(tmp_path / "here" / "scores.json", back / "analysis" / "2l")
    scores = back / "analysis" / "2l" / "scores.json"
    saved = json.loads(scores.read_text())
    saved["workdir"] = "/root/w/2l"  # the other machine's path
    scores.write_text(json.dumps(saved))
    assert cli.main(["claims", "--scores", str(back / "analysis")]) == 0
    out = json.loads((back / "analysis" / "claims.json").read_text())
    assert out["rows"] == json.loads(json.dumps(rows))
    assert [c["verdict"] for c in out["claims"]] == [c["verdict"] for c in found]
    assert [c["evidence"] for c in out["claims"]] == [c["evidence"] for c in found]
    assert "Claims checked again" in (back / "analysis" / "results.md").read_text()
    with pytest.raises(ValueError, match="2l has scores in two"):
        claims.load_saved([str(back / "analysis"), str(tmp_path / "here")])
    with pytest.raises(FileNotFoundError, match="scores.json"):
        claims.load_saved([str(tmp_path / "nothing")])
    shutil.rmtree(back / "2l")
    with pytest.raises(FileNotFoundError, match="no run folder"):
        claims.load_saved([str(back / "analysis")])
