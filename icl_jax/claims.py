"""The paper's four claims, checked on what `analyze` writes for the family.

check_claims(result) takes analysis.analyze's result for the members 1l, 2l, 3l, 1l-smear,
2l-smear and 2l-mlp (or claims.load_saved's, from scores.json files) and gives, for each
claim (co-occurrence, co-perturbation, ablation, mechanism), a verdict: "supported", "not
supported" or "inconclusive". Each claim rests on a sentence of the paper (Olsson et al.
2022, arXiv 2209.11895; the "quote" of each entry of CLAIMS), and each of its checks on
the sentence it operationalizes (the check's "basis"), on the members the paper names. Where the paper
gives no number, the threshold is ours, and the check's "ours" says why it sits where it
does (THRESHOLDS holds them all, OURS the reasons). A check's status is "pass", "fail",
"unmeasurable", or "shown": reported beside the verdict without counting, for what the
paper does not claim. A claim is not supported when any counted check fails, inconclusive
when none fails but one cannot be measured, supported when every counted check passes.
"""
from __future__ import annotations

import functools
import json

import numpy as np

from icl_jax import stats
from icl_jax import workdir as workdir_lib
from icl_jax.configs.sweeps.paper_small import FAMILY

PAPER = "https://arxiv.org/abs/2209.11895"

THRESHOLDS = {
    # claim 1: the held-out loss falls at least this many times faster inside the window
    # than over the equally long spans before and after it (each span needs this many
    # evaluation points)
    "loss_bump": 1.5, "loss_points": 3,
    # claim 1: the PCA trajectory's chords before and through the window turn by at least this
    "pivot_deg": 45.0,
    # claim 1: the 1L control's loss bump over 2L's window fails it only if 1L's excess fall
    # (inside minus the faster of before and after) is also this share of 2L's excess
    "control_fraction": 0.1,
    # claim 2: the share of 2L-smear's fall of the ICL score done before 2L's window opens
    "smear_formed_share": 0.5,
    # claim 3: the induction heads' summed attribution over the ICL gained
    "ablation_share": 0.5,
    # claim 4: a previous-token head's score; K-composition above random matrices' mean +
    # this many sd (Monte Carlo, fixed seed, the run's shapes)
    "previous_token": 0.5, "k_baseline_sd": 3.0, "k_baseline_samples": 2000,
}

OURS = {
    "loss_bump": "the paper gives no number for 'visibly steeper': ours is 1.5x the faster of "
                 "the two neighbouring spans, a bump a reader sees on a linear axis; three "
                 "evaluation points per span at least, so that each slope is a fit, not two points",
    "pivot_deg": "the paper gives no angle for a pivot: ours is 45 deg, halfway from going "
                 "straight on to a right angle, counted only where both chords are longer than "
                 "3x what the trajectory's own jitter gives (a plateau cannot pivot)",
    "control_fraction": "ours: a 1L loss wobbling over 2L's window can show a steeper span in "
                        "the ratio at a tenth of the nats; only an excess of at least 0.1 of the "
                        "reference member's is the bump the claim is about",
    "smear_formed_share": "ours: the paper's alternative is 'the rest at the same time as the "
                          "original phase change'; 'most of it before' is read as more than half "
                          "of the fall done when 2L's window opens",
    "ablation_share": "the paper's table rates the induction heads' contribution 'Contributes "
                      "Majority': more than half of the in-context learning gained",
    "previous_token": "ours: a head that puts most (over half) of its attention on the previous token",
    "k_baseline_sd": "ours: composition of unrelated heads of these shapes (random matrices) "
                     "is noise; 3 sd above its mean is not",
    "drop": "the phase-change rule's threshold: max(0.1 nats, 3 standard errors of the change, "
            "paired over the evaluation examples, with the model's wobble between snapshots)",
    "rise": "none: the half-rise of prefix matching is located to within the snapshots around "
            "it, which must overlap the window",
}

# which members each claim names (the family, in the order results.md lists it, is
# configs/sweeps/paper_small.py's FAMILY, the members its "family" subset trains)
CO_OCCURRENCE = ("2l", "3l", "2l-mlp")  # small attention-only models and models with MLPs
CONTROL, REFERENCES = "1l", ("2l", "3l")  # 1L over 2L's window (3L's if 2L has none)
SMEARED = ("1l-smear", "2l-smear")
ABLATED = ("2l", "3l")  # small attention-only models
MECHANISM = ("2l",)

CLAIMS = {
    "1": {"title": "1. Co-occurrence", "argument": "Argument 1",
          "quote": "Induction heads form during a phase change visible as a bump in the "
                   "training loss; in the same window the in-context learning score improves, "
                   "the loss shows \"visibly steeper improvement than the parts of the curve "
                   "before and after\" and \"diverges from a one-layer model\", and the "
                   "per-token-loss PCA trajectory pivots (\"the model's trajectory abruptly "
                   "changes\"). One-layer models show none of it."},
    "2": {"title": "2. Co-perturbation", "argument": "Argument 2",
          "quote": "\"(1) a one-layer smeared-key model experiences the phase change ... (2) the "
                   "two-layer smeared-key model experiences a phase change earlier than a "
                   "baseline model.\""},
    "3": {"title": "3. Ablation", "argument": "Argument 3",
          "quote": "\"Almost all the in-context learning in small attention-only models appears "
                   "to come from these induction heads! This begins at the start of the phase "
                   "change, and remains true through the end of training.\""},
    "4": {"title": "4. Mechanism", "argument": "Argument 5",
          "quote": "The induction head uses K-composition with \"an earlier 'previous token "
                   "head'\" and copies what it attends to through its OV circuit."},
}

BASIS = {
    "window": "the window is \"selected based on the derivative of the in-context score\"",
    "heads": "\"induction heads form\" in the phase-change window",
    "bump": "the loss shows \"visibly steeper improvement than the parts of the curve before "
            "and after\" (small models are plotted on a linear token axis)",
    "diverge": "in the window the loss \"diverges from a one-layer model\"",
    "pivot": "the PCA trajectories \"pivot\": \"the model's trajectory abruptly changes\"",
    "control": "one-layer models show none of it: no phase change, no induction heads",
    "smear1": "\"(1) a one-layer smeared-key model experiences the phase change\"",
    "smear2": "\"(2) the two-layer smeared-key model experiences a phase change earlier than a "
              "baseline model\"",
    "smear_rest": "the alternative the paper tests against: some in-context learning early "
                  "\"and the rest at the same time as the original phase change\"",
    "smear_members": "smeared keys are \"a targeted architectural experiment\" (Argument 2), "
                     "not one of Argument 1's small models: shown, not counted",
    "majority": "\"almost all the in-context learning ... appears to come from these induction "
                "heads! This begins at the start of the phase change, and remains true through "
                "the end of training\" (its table: \"Contributes Majority\")",
    "others": "footnote 17: ablating most other heads appears to increase in-context learning; "
              "footnote 23: \"the only other potential contender ... would be basic copying "
              "heads\" (reported, not a claim)",
    "layer": "an induction head in a later layer, which can K-compose with an earlier one",
    "prev": "it K-composes with \"an earlier 'previous token head'\"",
    "kcomp": "K-composition with earlier previous-token heads, weighted by their previous-token "
             "scores over all earlier heads",
    "copy": "an induction head copies: its OV circuit raises the logits of the tokens it "
            "attends to (a positive copying score)",
    "largest": "not the paper's: the previous-token head's K-composition the largest of all "
               "earlier heads' (reported, not counted)",
}


# ----------------------------------------------------------------------------- checks

def _check(member, name, value, threshold, status, note="", basis="", ours=None,
           key=False) -> dict:
    def num(v):
        if v is None or isinstance(v, (str, bool)):
            return v
        if isinstance(v, (list, tuple)):
            return [num(x) for x in v]
        return float(v)
    return {"member": member, "check": name, "value": num(value), "threshold": num(threshold),
            "status": status, "note": note, "basis": BASIS.get(basis, basis),
            "ours": OURS.get(ours, ours) if ours else None, "key": key}


def _status(ok: bool) -> str:
    return "pass" if ok else "fail"


def _shown(checks: list[dict]) -> list[dict]:
    """The same checks reported beside the verdict without counting; each keeps its own
    pass or fail at the front of its note."""
    for c in checks:
        if c["status"] == "shown":  # reported only, with no pass or fail of its own
            continue
        c["note"] = f"{c['status']}; shown, not counted" + (f"; {c['note']}" if c["note"] else "")
        c["status"], c["key"] = "shown", False
    return checks


def verdict(checks) -> str:
    """Any counted check failed: "not supported"; else any unmeasurable: "inconclusive"; else
    "supported". Checks with status "shown" are reported beside the verdict, not counted."""
    statuses = {c["status"] for c in checks if c["status"] != "shown"}
    if not statuses or "fail" in statuses:
        return "not supported"
    return "inconclusive" if "unmeasurable" in statuses else "supported"


def decisive(checks) -> list[int]:
    """Indices of the one or two checks that decide the verdict: the failed ones, else the
    unmeasurable ones, else the claim's key checks."""
    for want in ("fail", "unmeasurable"):
        found = [i for i, c in enumerate(checks) if c["status"] == want]
        if found:
            return found[:2]
    return [i for i, c in enumerate(checks) if c.get("key")][:2]


def _window(pc) -> tuple[float, float] | None:
    return (pc["start_step"], pc["end_step"]) if pc.get("detected") else None


def _missing(member) -> dict:
    return _check(member, "member trained", None, None, "unmeasurable", "not in this run")


# ----------------------------------------------------------------------------- measurements

def rise_in_window(steps, values, window) -> tuple[int, bool, str]:
    """(step, in window, note): the first snapshot at which `values` has covered half its rise
    from its first value to its largest, and whether the rise can lie in `window`: the half
    is crossed between that snapshot and the one before it, and that span must overlap the
    window (the snapshots cannot place it more finely)."""
    v, s = np.asarray(values, np.float64), np.asarray(steps, np.float64)
    target = v[0] + 0.5 * (v.max() - v[0])
    i = int(np.argmax(v >= target))
    lo = s[i - 1] if i > 0 else s[i]
    ok = lo <= window[1] and s[i] >= window[0]
    return int(s[i]), ok, f"half of the rise to {v.max():.2f} crossed in steps {lo:.0f}-{s[i]:.0f}"


def _slope(s, l, a, b, min_points):
    """(fall per 1,000 steps by least squares over [a, b], points in it)."""
    m = (s >= a) & (s <= b)
    if m.sum() < min_points:
        return None, int(m.sum())
    return -1000.0 * float(np.polyfit(s[m], l[m], 1)[0]), int(m.sum())


def loss_fall_rates(eval_loss, window, min_points: int = THRESHOLDS["loss_points"]):
    """(inside, before, after, note): how fast the held-out loss falls (nats per 1,000 steps,
    least-squares slopes of the loss against step, a linear axis as the paper plots small
    models) inside the window (start, end), over the equally long span just before it and
    over the one just after it (cut at the last evaluation). None where a span has fewer than
    `min_points` evaluations."""
    s = np.asarray(eval_loss.get("steps", []), np.float64)
    l = np.asarray(eval_loss.get("loss", []), np.float64)
    if len(s) == 0:
        return None, None, None, "no held-out loss logged"
    a, b = float(window[0]), float(window[1])
    w = b - a
    inside, n_in = _slope(s, l, a, b, min_points)
    before, n_before = _slope(s, l, a - w, a, min_points)
    after, n_after = _slope(s, l, b, b + w, min_points)
    if inside is None or before is None or after is None:
        return None, None, None, (f"{n_before}, {n_in} and {n_after} evaluations before, in and "
                                  f"after the window (each needs {min_points})")
    return inside, before, after, (f"falls {inside:.3g} nats per 1k steps in the window, "
                                   f"{before:.3g} before, {after:.3g} after")


def loss_bump(eval_loss, window, min_points: int = THRESHOLDS["loss_points"]):
    """(ratio, note): the loss's fall inside the window over the faster of the falls before and
    after it (loss_fall_rates); None where unmeasurable or where neither neighbour falls (a
    bump without a ratio: the note says which)."""
    inside, before, after, note = loss_fall_rates(eval_loss, window, min_points)
    if inside is None:
        return None, note
    side = max(before, after)
    return (inside / side if side > 0 else None), note


def divergence(run, control, window, rule) -> tuple[float | None, float | None, str]:
    """(growth, threshold, note): how much the gap between the control's held-out loss and the
    member's (control minus member, each example's mean loss over its context, interpolated
    linearly in step) grows from the window's start to its end, and the smallest growth
    that counts: the phase-change rule's drop threshold for this change (3 standard errors,
    paired over the evaluation examples both models share, with the gap's wobble between
    snapshots; at least min_drop)."""
    if run.get("loss_by_example") is None or control.get("loss_by_example") is None:
        return None, None, "no per-example losses in scores.json (analyze again to add them)"
    a, b = window
    gaps = []
    for t in (a, b):
        m = stats.interpolate_rows(run["steps"], run["loss_by_example"], t)
        c = stats.interpolate_rows(control["steps"], control["loss_by_example"], t)
        if m.shape != c.shape:
            return None, None, "the two models were evaluated on different examples"
        gaps.append(c - m)
    d = gaps[1] - gaps[0]
    paired = float(d.std(ddof=1) / np.sqrt(len(d)))
    steps = np.asarray(run["steps"], np.float64)
    series = [float((stats.interpolate_rows(control["steps"], control["loss_by_example"], t)
                     - stats.interpolate_rows(run["steps"], run["loss_by_example"], t)).mean())
              for t in steps]
    noise = float(np.hypot(paired, np.sqrt(2) * stats.wobble(series)))
    threshold = stats.drop_threshold(noise, rule)
    return float(d.mean()), threshold, (f"gap to 1L {gaps[0].mean():+.3f} -> "
                                        f"{gaps[1].mean():+.3f} nats")


def icl_drop_over(run, window) -> tuple[float, float]:
    """(drop, threshold) of the raw ICL score across `window`, by the run's phase-change
    rule's axis and noise (stats.drop_over)."""
    pc = run["phase_change"]
    return stats.drop_over(run["steps"], run["icl_score"], window, pc["rule"],
                           icl_by_example=run.get("icl_by_example"), icl_se=run.get("icl_se"),
                           wobble_=pc.get("wobble"))


def formed_before(run, step, window) -> tuple[float | None, str]:
    """(share, note): the share of a run's fall of the ICL score (from its highest point after
    initialisation up to its own window's start, `window`, to its last snapshot) done by
    `step`, the raw score interpolated linearly in ln(step)."""
    s = np.asarray(run["steps"], np.float64)
    y = np.asarray(run["icl_score"], np.float64)
    keep = s > 0
    s, y = s[keep], y[keep]
    early = s <= window[0]
    top = float(y[early].max()) if early.any() else float(y[0])
    at = float(np.interp(np.log(max(step, 1)), np.log(s), y))
    total = top - float(y[-1])
    if total <= 0:
        return None, "its ICL score does not fall"
    return (top - at) / total, (f"from {top:+.2f} to {y[-1]:+.2f}; {at:+.2f} at step "
                                f"{step:,.0f}")


@functools.lru_cache(maxsize=16)
def k_composition_baseline(d_model: int, d_head: int, samples: int = 2000, seed: int = 0):
    """(mean, sd) of the K-composition score between two heads whose W_Q, W_K, W_V [d_model,
    d_head] and W_O [d_head, d_model] are iid Gaussian: what composition of unrelated heads
    of these shapes scores, by Monte Carlo with a fixed seed."""
    rng = np.random.default_rng([seed, d_model, d_head])
    out = np.empty(samples)
    for i in range(samples):
        W_Q, W_K, W_V = rng.normal(size=(3, d_model, d_head))
        W_O = rng.normal(size=(d_head, d_model))
        QK, OV = W_Q @ W_K.T, W_V @ W_O  # the later head's QK, the earlier head's OV
        out[i] = np.linalg.norm(OV @ QK.T) / (np.linalg.norm(OV) * np.linalg.norm(QK))
    return float(out.mean()), float(out.std())


def previous_token_weighted_k(prev_LH, k_into_LH) -> float:
    """The K-composition of a head with the earlier heads [L, H], each weighted by its
    previous-token score: sum(prev x K) / sum(prev)."""
    p, k = np.asarray(prev_LH, np.float64), np.asarray(k_into_LH, np.float64)
    return float((p * k).sum() / max(p.sum(), 1e-12))


# ----------------------------------------------------------------------------- claim 1

def _co_occurrence(n, run, control, pca, t) -> list[dict]:
    pc, win = run["phase_change"], _window(run["phase_change"])
    checks = [_check(n, "ICL phase change (drop, nats)", pc["drop"] if win else None,
                     pc.get("drop_threshold"), _status(bool(win)), "" if win else pc["reason"],
                     "window", "drop", key=True)]
    # a layer-0 head can only match prefixes with smeared keys (claim 2's point)
    first = 0 if run["model"]["smear_keys"] else 1
    pm = np.asarray(run["prefix_matching"])[:, first:].max(axis=(1, 2))
    label = f"induction heads (layers >= {first}) form in the window: half their rise"
    if pm.max() <= run["thresholds"]["prefix_matching"]:
        checks.append(_check(n, label, float(pm.max()), run["thresholds"]["prefix_matching"],
                             "fail", "no head there reaches the induction threshold", "heads",
                             "rise", key=True))
    elif not win:
        checks.append(_check(n, label, None, None, "unmeasurable", "no window", "heads", "rise"))
    else:
        step, ok, note = rise_in_window(run["steps"], pm, win)
        checks.append(_check(n, label, step, list(win), _status(ok), note, "heads", "rise",
                             key=True))
    label = "held-out loss: steeper in the window than before and after (ratio)"
    if not win:
        checks.append(_check(n, label, None, t["loss_bump"], "unmeasurable", "no window",
                             "bump", "loss_bump"))
    else:
        ratio, note = loss_bump(run["eval_loss"], win)
        inside = loss_fall_rates(run["eval_loss"], win)[0]
        status = ("unmeasurable" if inside is None else "fail" if inside <= 0 else
                  "pass" if ratio is None else _status(ratio >= t["loss_bump"]))
        checks.append(_check(n, label, ratio, t["loss_bump"], status, note, "bump", "loss_bump"))
    label = "held-out loss diverges from 1L's across the window (gap growth, nats)"
    if not win or control is None:
        checks.append(_check(n, label, None, None, "unmeasurable",
                             "no window" if not win else "no 1L control in this run", "diverge",
                             "drop"))
    else:
        growth, threshold, note = divergence(run, control, win, pc["rule"])
        checks.append(_check(n, label, growth, threshold, "unmeasurable" if growth is None
                             else _status(growth >= threshold), note, "diverge", "drop"))
    label = "PCA trajectory pivots at the window"
    traj = pca["trajectories"].get(n)
    if not win or not traj:
        checks.append(_check(n, label, None, t["pivot_deg"], "unmeasurable",
                             "no window" if not win else "no shared PCA", "pivot", "pivot_deg"))
    else:
        p = stats.pca_pivot(traj["points"], traj["steps"], win, onset=pc.get("onset_step"),
                            min_turn_deg=t["pivot_deg"])
        checks.append(_check(n, label, p["turn_deg"], t["pivot_deg"],
                             "unmeasurable" if p["pivot"] is None else _status(p["pivot"]),
                             p["note"], "pivot", "pivot_deg"))
    return checks


def _control(runs, pca, t) -> list[dict]:
    """The 1L control over the reference member's window must show none of claim 1's signals."""
    if CONTROL not in runs:
        return [_check(CONTROL, "control trained", None, None, "unmeasurable", "not in this run")]
    run = runs[CONTROL]
    pc = run["phase_change"]
    checks = [_check(CONTROL, "no phase change of its own", pc["detected"], False,
                     _status(not pc["detected"]), pc["reason"], "control", "drop"),
              _check(CONTROL, "no induction head", len(run["induction_heads"]), 0,
                     _status(not run["induction_heads"]), "", "control")]
    ref = next((m for m in REFERENCES if m in runs and runs[m]["phase_change"]["detected"]), None)
    if ref is None:
        return checks + [_check(CONTROL, "control window", None, None, "unmeasurable",
                                "neither 2l nor 3l has a window to measure 1l over", "control")]
    win = _window(runs[ref]["phase_change"])
    span = f"over {ref}'s window {win[0]:,}-{win[1]:,}"
    drop, thr = icl_drop_over(run, win)
    checks.append(_check(CONTROL, f"ICL drop {span} below the detection threshold", drop, thr,
                         _status(drop < thr), "", "control", "drop"))
    own, theirs = loss_fall_rates(run["eval_loss"], win), loss_fall_rates(runs[ref]["eval_loss"], win)
    checks.append(_control_bump(ref, span, own, theirs, t))
    traj = pca["trajectories"].get(CONTROL)
    label = f"no PCA pivot {span}"
    if not traj:
        checks.append(_check(CONTROL, label, None, t["pivot_deg"], "unmeasurable",
                             "no shared PCA", "pivot", "pivot_deg"))
    else:
        ref_pc = runs[ref]["phase_change"]
        p = stats.pca_pivot(traj["points"], traj["steps"], win, onset=ref_pc.get("onset_step"),
                            min_turn_deg=t["pivot_deg"])
        checks.append(_check(CONTROL, label, p["turn_deg"], t["pivot_deg"],
                             "unmeasurable" if p["pivot"] is None else _status(not p["pivot"]),
                             p["note"], "pivot", "pivot_deg"))
    return checks


def _control_bump(ref, span, own, theirs, t) -> dict:
    """1L's loss bump over the reference member's window: it fails when 1L's fall inside
    reaches `loss_bump` x the faster of its falls before and after, and its excess (inside
    minus that) is also at least `control_fraction` of the reference's excess."""
    label = f"no held-out loss bump {span} (ratio)"
    inside, before, after, note = own
    if inside is None:
        return _check(CONTROL, label, None, t["loss_bump"], "unmeasurable", note, "control",
                      "loss_bump")
    side = max(before, after)
    ratio = inside / side if side > 0 else None
    if inside <= 0 or (ratio is not None and ratio < t["loss_bump"]):
        return _check(CONTROL, label, ratio, t["loss_bump"], "pass", note, "control", "loss_bump")
    r_in, r_before, r_after, _ = theirs
    ref_excess = None if r_in is None else r_in - max(r_before, r_after)
    if ref_excess is None or ref_excess <= 0:
        return _check(CONTROL, label, ratio, t["loss_bump"], "fail",
                      f"{note}; {ref} has no excess over the window to compare with", "control",
                      "loss_bump")
    fraction = (inside - side) / ref_excess
    return _check(CONTROL, label, ratio, t["loss_bump"],
                  _status(fraction < t["control_fraction"]),
                  f"{note}; excess {inside - side:.3g} = {fraction:.3f} of {ref}'s "
                  f"{ref_excess:.3g}", "control", "control_fraction")


def claim1(runs, pca, t) -> list[dict]:
    checks = []
    control = runs.get(CONTROL)
    for n in CO_OCCURRENCE:
        checks += _co_occurrence(n, runs[n], control, pca, t) if n in runs else [_missing(n)]
    checks += _control(runs, pca, t)
    if "2l-smear" in runs:
        shown = _shown(_co_occurrence("2l-smear", runs["2l-smear"], control, pca, t))
        for c in shown:
            c["note"] += f"; {BASIS['smear_members']}"
        checks += shown
    return checks


# ----------------------------------------------------------------------------- claim 2

def claim2(runs, t) -> list[dict]:
    checks = []
    if "1l-smear" not in runs:
        checks.append(_missing("1l-smear"))
    else:
        s1 = runs["1l-smear"]
        pc = s1["phase_change"]
        checks.append(_check("1l-smear", "ICL phase change (drop, nats)",
                             pc["drop"] if pc["detected"] else None, pc.get("drop_threshold"),
                             _status(pc["detected"]), pc["reason"], "smear1", "drop", key=True))
        checks.append(_check("1l-smear", "induction heads", len(s1["induction_heads"]), ">= 1",
                             _status(bool(s1["induction_heads"])), "", "smear1"))
    label = "2l-smear's phase change starts before 2l's (start steps)"
    if "2l-smear" not in runs or "2l" not in runs:
        return checks + [_check("2l-smear", label, None, None, "unmeasurable",
                                "2l or 2l-smear is not in this run", "smear2")]
    smear = runs["2l-smear"]
    # the paper's claim is about timing: the smeared change is judged without the width
    # condition (it says nothing about how abrupt that change is)
    a = smear.get("phase_change_timing") or smear["phase_change"]
    b = runs["2l"]["phase_change"]
    if not a["detected"]:
        checks.append(_check("2l-smear", label, None, b["start_step"], "fail",
                             f"2l-smear has no phase change ({a['reason']})", "smear2",
                             key=True))
        return checks
    if not b["detected"]:
        return checks + [_check("2l-smear", label, a["start_step"], None, "unmeasurable",
                                f"2l has no phase change to compare with ({b['reason']})",
                                "smear2")]
    checks.append(_check("2l-smear", label, a["start_step"], b["start_step"],
                         _status(a["start_step"] < b["start_step"]),
                         f"2l-smear {a['start_step']:,}-{a['end_step']:,} (timing: width not "
                         f"judged), 2l {b['start_step']:,}-{b['end_step']:,}", "smear2",
                         key=True))
    share, note = formed_before(smear, b["start_step"], _window(a))
    checks.append(_check("2l-smear", "share of 2l-smear's ICL fall done before 2l's window "
                         "opens", share, t["smear_formed_share"], "fail" if share is None
                         else _status(share > t["smear_formed_share"]), note, "smear_rest",
                         "smear_formed_share"))
    return checks


# ----------------------------------------------------------------------------- claim 3

def attribution_share(abl_LH, ind) -> float:
    """The induction heads' summed attribution (ICL ablated minus clean, per head)."""
    abl = np.asarray(abl_LH, np.float64)
    return float(sum(abl[l, h] for l, h in ind))


def _ablation(n, run, t) -> list[dict]:
    ind, pc = run["induction_heads"], run["phase_change"]
    if not ind:
        return [_check(n, "induction heads to ablate", 0, ">= 1", "fail", "", "majority")]
    if not pc["detected"]:
        return [_check(n, "ICL gained since before the phase change", None, None,
                       "unmeasurable", "no phase change to measure the gain from", "majority")]
    steps = np.asarray(run["steps"])
    icl = np.asarray(run["icl_score"], np.float64)
    gained = pc["icl_before"] - icl
    from_start = [i for i in range(len(steps)) if steps[i] >= pc["start_step"]]
    counted = [i for i in from_start if gained[i] >= pc["drop_threshold"]]
    names = ", ".join(f"L{a}H{b}" for a, b in ind)
    label = (f"{names}' summed attribution / ICL gained, at every snapshot from the window's "
             "start to the end of training")
    if not counted:
        return [_check(n, label, None, t["ablation_share"], "unmeasurable",
                       f"no snapshot from the window's start on where the ICL gained clears "
                       f"the noise ({pc['drop_threshold']:.3f} nats)", "majority",
                       "ablation_share")]
    shares = {int(steps[i]): attribution_share(run["ablation_icl"][i], ind) / gained[i]
              for i in counted}
    worst = min(shares, key=shares.get)
    last = int(steps[-1])
    note = (f"{len(shares)} snapshots (from step {min(shares):,}; those where the gain clears "
            f"{pc['drop_threshold']:.3f} nats); smallest {shares[worst]:.2f} at step {worst:,}"
            + (f", last {shares[last]:.2f}" if last in shares else ""))
    checks = [_check(n, label, shares[worst], t["ablation_share"],
                     _status(shares[worst] > t["ablation_share"]), note, "majority",
                     "ablation_share", key=True)]
    # what the paper reports of the other heads, shown
    abl = np.asarray(run["ablation_icl"][-1], np.float64)
    cp = np.asarray(run["copying"][-1], np.float64)
    mask = np.zeros(abl.shape, bool)
    for a, b in ind:
        mask[a, b] = True
    if (~mask).any():
        other = np.where(mask, -np.inf, abl)
        l, h = np.unravel_index(int(np.argmax(other)), abl.shape)
        carried = attribution_share(abl, ind)
        checks.append(_check(
            n, f"last snapshot: largest other head L{l}H{h}'s attribution / the induction "
               "heads'", abl[l, h] / carried if carried > 0 else None, None, "shown",
            f"its copying score {cp[l, h]:+.2f}" + (" (a copying head: footnote 23's "
            "contender)" if cp[l, h] > 0 else "") + f"; {int((abl[~mask] < 0).sum())} of "
            f"{int((~mask).sum())} other heads' ablations raise in-context learning "
            "(reported, not a claim)", "others"))
    return checks


def claim3(runs, t) -> list[dict]:
    checks = []
    for n in ABLATED:
        checks += _ablation(n, runs[n], t) if n in runs else [_missing(n)]
    if "2l-smear" in runs:
        shown = _shown(_ablation("2l-smear", runs["2l-smear"], t))
        for c in shown:
            c["note"] += "; smeared keys are claim 2's intervention, the paper ablates vanilla models"
        checks += shown
    return checks


# ----------------------------------------------------------------------------- claim 4

def _mechanism(n, run, t) -> list[dict]:
    pm, cp = np.asarray(run["prefix_matching"][-1]), np.asarray(run["copying"][-1])
    later = [(l, h) for l, h in run["induction_heads"] if l >= 1]
    if not later:
        where = ", ".join(f"L{l}H{h}" for l, h in run["induction_heads"]) or "none"
        return [_check(n, "induction head in layer >= 1", 0, ">= 1", "fail",
                       f"induction heads: {where}; a layer-0 head cannot K-compose with anything",
                       "layer", key=True)]
    l1, h1 = max(later, key=lambda lh: pm[lh])
    checks = [_check(n, "induction head in layer >= 1", f"L{l1}H{h1}", ">= 1 head", "pass",
                     f"prefix matching {pm[l1, h1]:.2f}", "layer", key=True)]
    prev = np.asarray(run["previous_token"][-1])[:l1]  # the earlier layers
    lp, hp = np.unravel_index(int(np.argmax(prev)), prev.shape)
    checks.append(_check(n, f"previous-token head in an earlier layer (L{lp}H{hp})",
                         prev[lp, hp], t["previous_token"],
                         _status(prev[lp, hp] > t["previous_token"]), "", "prev",
                         "previous_token"))
    k_into = np.asarray(run["composition"]["k"][-1])[:l1, :, l1, h1]  # [earlier L, H]
    weighted = previous_token_weighted_k(prev, k_into)
    model = run["model"]
    mean, sd = k_composition_baseline(int(model["d_model"]), int(model["d_head"]),
                                      t["k_baseline_samples"])
    base = mean + t["k_baseline_sd"] * sd
    checks.append(_check(n, f"previous-token-weighted K-composition into L{l1}H{h1}", weighted,
                         base, _status(weighted > base),
                         f"random heads: {mean:.3f} +- {sd:.3f} (d_model {model['d_model']}, "
                         f"d_head {model['d_head']}, {t['k_baseline_samples']} samples, seed 0; "
                         "the sd of one pair, which a weighted mean of pairs does not exceed)",
                         "kcomp", "k_baseline_sd", key=True))
    checks.append(_check(n, f"copying score of L{l1}H{h1}", cp[l1, h1], 0.0,
                         _status(cp[l1, h1] > 0), "", "copy"))
    others = k_into.copy()
    others[lp, hp] = -np.inf
    top = float(others.max()) if np.isfinite(others.max()) else None
    checks += _shown([_check(n, f"K-composition L{lp}H{hp} -> L{l1}H{h1} is the largest from "
                                "earlier-layer heads", k_into[lp, hp], top,
                             _status(top is None or k_into[lp, hp] > top), "", "largest")])
    return checks


def claim4(runs, t) -> list[dict]:
    checks = []
    for n in MECHANISM:
        checks += _mechanism(n, runs[n], t) if n in runs else [_missing(n)]
    return checks


# ----------------------------------------------------------------------------- all four

def _best_head(run):
    pm = np.asarray(run["prefix_matching"][-1])
    l, h = np.unravel_index(int(np.argmax(pm)), pm.shape)
    return int(l), int(h), float(pm[l, h]), float(np.asarray(run["copying"][-1])[l, h])


def _row(name, run, traj) -> dict:
    pc = run["phase_change"]
    l, h, pm, cp = _best_head(run)
    ind = run["induction_heads"]
    abl = np.asarray(run["ablation_icl"][-1])
    gained = pc["icl_before"] - run["icl_score"][-1] if pc["detected"] else None
    carried = sum(abl[a, b] for a, b in ind)
    pivot = (traj or {}).get("pivot") or {}
    return {
        "model": name,
        "phase change": (f"steps {pc['start_step']:,}-{pc['end_step']:,} "
                         f"({pc['start_tokens'] / 1e6:.1f}M-{pc['end_tokens'] / 1e6:.1f}M tokens)"
                         if pc["detected"] else "none"),
        "ICL before -> after": (f"{pc['icl_before']:+.2f} -> {pc['icl_after']:+.2f} "
                                f"(drop {pc['drop']:.2f} >= {pc['drop_threshold']:.2f})"
                                if pc["detected"] else f"{run['icl_score'][-1]:+.2f} (last)"),
        "best head, any layer (prefix, copying)": f"L{l}H{h} ({pm:.2f}, {cp:+.2f})",
        "induction heads": ", ".join(f"L{a}H{b}" for a, b in ind) or "none",
        "their summed ablation / ICL gained": (f"{carried:+.2f} / {gained:+.2f}"
                                               if ind and gained is not None else "-"),
        "PCA at the window": ("-" if pivot.get("pivot") is None else
                              ("pivots" if pivot["pivot"] else "no pivot")
                              + (f" ({pivot['turn_deg']:.0f} deg)"
                                 if pivot.get("turn_deg") is not None else "")),
    }


def _evidence(checks) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return "; ".join(f"{c['member']}: {c['check']} {fmt(c['value'])} vs {fmt(c['threshold'])} "
                     f"{c['status'].upper() if c['status'] != 'pass' else 'pass'}"
                     + (f" ({c['note']})" if c["note"] and c["status"] != "pass" else "")
                     for c in checks)


def check_claims(result: dict, thresholds: dict | None = None
                 ) -> tuple[list[dict], list[dict]]:
    """(rows per member, the four claims) from an analysis of the family (analysis.analyze's
    or load_saved's result: "runs" {name: what scores.json holds}, "pca"). Each claim:
    {claim, verdict, holds, quote, argument, paper, checks, decisive (indices of the checks
    that decide it), evidence (the checks in one line)}."""
    t = {**THRESHOLDS, **(thresholds or {})}
    runs, pca = dict(result["runs"]), result["pca"]
    if "2l-smear" in runs and "phase_change_timing" not in runs["2l-smear"]:
        runs["2l-smear"] = {**runs["2l-smear"], "phase_change_timing":
                            stats.phase_change_of(runs["2l-smear"], abrupt=False)}
    rows = [_row(n, r, pca["trajectories"].get(n)) for n, r in result["runs"].items()]
    found = []
    for key, checks in (("1", claim1(runs, pca, t)), ("2", claim2(runs, t)),
                        ("3", claim3(runs, t)), ("4", claim4(runs, t))):
        v = verdict(checks)
        c = CLAIMS[key]
        found.append({"claim": c["title"], "verdict": v, "holds": v == "supported",
                      "quote": c["quote"], "argument": c["argument"], "paper": PAPER,
                      "checks": checks, "decisive": decisive(checks),
                      "evidence": _evidence(checks)})
    return rows, found


# ----------------------------------------------------------------------------- saved analyses

def load_saved(folders) -> dict:
    """analysis.analyze's result (runs and a shared PCA) rebuilt from analyses saved on disk
    or in a bucket (gs://), possibly made on different machines: each folder holds
    <member>/scores.json for some of FAMILY, as `analyze --out` writes them (or one run's
    scores.json). Only scores.json is read: it holds the model's shape and the held-out
    loss (an analysis saved before it did is read with its run folder's config.json and
    metrics.jsonl). The phase change is found again and one PCA fitted over all members,
    with the code as it stands; members of one family share the evaluation set."""
    runs = {}
    for folder in folders:
        base = workdir_lib.path(folder)
        paths = [base / n / "scores.json" for n in FAMILY] + [base / "scores.json"]
        for path in paths:
            if not path.exists():
                continue
            run = workdir_lib.read_json(path)  # a damaged one: an error naming it
            name = path.parent.name if path != base / "scores.json" else run.get("name")
            if name not in FAMILY:
                continue
            if name in runs:
                raise ValueError(f"{name} has scores in two of the folders given "
                                 f"({runs[name]['scores_file']} and {path}); give one")
            if "model" not in run or "eval_loss" not in run:
                _from_run_folder(run, name, base)
            run["scores_file"] = str(path)
            run["phase_change"] = stats.phase_change_of(run)
            runs[name] = run
    if not runs:
        raise FileNotFoundError(f"no <member>/scores.json of {', '.join(FAMILY)} in "
                                f"{', '.join(map(str, folders))}")
    return {"runs": runs, "pca": stats.shared_pca(runs)}


def _from_run_folder(run, name, base):
    """An older scores.json without the model's shape or the held-out loss: both from the
    run's folder (its recorded workdir, else <folder>/../<member>)."""
    from icl_jax import analysis, config as config_lib
    homes = [h for h in (run.get("workdir"), str(base.parent / name)) if h]
    home = next((h for h in homes if workdir_lib.path(h).joinpath("config.json").exists()),
                None)
    if home is None:
        raise FileNotFoundError(f"no run folder (config.json) for {name}: looked in "
                                f"{', '.join(homes)}; its scores.json predates the model and "
                                "held-out loss it now holds (analyze the run again)")
    config = config_lib.from_dict(workdir_lib.read_config_dict(home))
    run.setdefault("model", analysis.model_shape(config.model))
    run.setdefault("eval_loss", analysis.held_out_loss(workdir_lib.read_metrics(home)))


# ----------------------------------------------------------------------------- results.md

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def claims_markdown(claims) -> list[str]:
    """The claims table (claim, verdict, the paper's sentence, the checks that decide it) and
    every check below it."""
    lines = ["| claim | verdict | the paper | decided by |", "| --- | --- | --- | --- |"]
    for c in claims:
        why = "; ".join(f"{c['checks'][i]['member']}: {c['checks'][i]['check']} "
                        f"{_fmt(c['checks'][i]['value'])} vs {_fmt(c['checks'][i]['threshold'])}"
                        f" ({c['checks'][i]['status']})" for i in c.get("decisive", []))
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {c.get('quote', '')} | {why} |")
    for c in claims:
        lines += ["", f"### {c['claim']}: {c['verdict']}", "",
                  "| member | check | value | threshold | status | note |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {ch['member']} | {ch['check']} | {_fmt(ch['value'])} | "
                  f"{_fmt(ch['threshold'])} | {ch['status']} | {ch['note']} |"
                  for ch in c["checks"]]
    return lines


def results_markdown(rows, claims, profile, train_seconds=0.0, analysis_seconds=0.0,
                     provenance: str | None = None, device: str = "") -> str:
    """results.md; provenance, where given, says where the numbers came from in place of
    the training and analysis times (claims checked again from saved analyses)."""
    cols = list(rows[0])
    lines = [f"# Results: profile `{profile}`", "",
             provenance or (f"Trained in {train_seconds / 60:.1f} minutes (all members) and "
                            f"analysed in {analysis_seconds / 60:.1f}"
                            + (f" ({device})" if device else "") + "."), "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "## The paper's claims", "",
              f"Each claim rests on a sentence of the paper ([Olsson et al. 2022]({PAPER})); "
              "each check on the sentence it operationalizes (claims.json: `basis`), with our "
              "own threshold where the paper gives none (`ours`). Status shown: reported beside "
              "the verdict, not counted.", ""]
    lines += claims_markdown(claims)
    return "\n".join(lines) + "\n"


def write_results(out, rows, claims, text: str, robustness: dict | None = None):
    """results.md (text) and claims.json (rows, claims, the thresholds and why, and the
    robustness over seeds where given) into the folder `out`."""
    out = workdir_lib.path(out)
    workdir_lib.write_text(out / "results.md", text)
    body = {"paper": PAPER, "rows": rows, "claims": claims, "thresholds": THRESHOLDS,
            "ours": OURS}
    if robustness is not None:
        body["robustness"] = robustness
    workdir_lib.write_text(out / "claims.json", json.dumps(body, indent=1))


# ----------------------------------------------------------------------------- seeds

def robustness(per_seed: dict) -> dict:
    """Over seeds ({seed: the four claims as check_claims gives them, or an error string
    for a seed that did not finish}): per claim the seeds supported, not supported and
    inconclusive; per seed each claim's verdict and its failing (or unmeasurable) checks."""
    titles = [c["title"] for c in CLAIMS.values()]
    table = {t: {"supported": [], "not supported": [], "inconclusive": [], "not run": []}
             for t in titles}
    seeds = {}
    for seed, claims in sorted(per_seed.items()):
        if isinstance(claims, str):
            for t in titles:
                table[t]["not run"].append(seed)
            seeds[seed] = {"error": claims}
            continue
        entry = {}
        for c in claims:
            table[c["claim"]][c["verdict"]].append(seed)
            entry[c["claim"]] = {"verdict": c["verdict"], "why": [
                f"{c['checks'][i]['member']}: {c['checks'][i]['check']} "
                f"{_fmt(c['checks'][i]['value'])} vs {_fmt(c['checks'][i]['threshold'])}"
                for i in c["decisive"]] if c["verdict"] != "supported" else []}
        seeds[seed] = entry
    return {"claims": table, "seeds": seeds}


def robustness_markdown(rob: dict) -> list[str]:
    lines = ["| claim | supported | not supported | inconclusive | not run |",
             "| --- | --- | --- | --- | --- |"]
    for title, t in rob["claims"].items():
        lines.append(f"| {title} | " + " | ".join(
            f"{len(t[k])}" + (f" (seeds {', '.join(map(str, t[k]))})" if t[k] and
                              k != "supported" else "")
            for k in ("supported", "not supported", "inconclusive", "not run")) + " |")
    lines += ["", "| seed | " + " | ".join(rob["claims"]) + " | what decided a verdict short "
              "of supported |", "| --- |" + " --- |" * (len(rob["claims"]) + 1)]
    for seed, entry in rob["seeds"].items():
        if "error" in entry:
            lines.append(f"| {seed} | " + " | ".join("-" for _ in rob["claims"])
                         + f" | {entry['error']} |")
            continue
        why = " / ".join(f"{t.split('.')[0]}: " + "; ".join(e["why"])
                         for t, e in entry.items() if e["why"])
        lines.append(f"| {seed} | " + " | ".join(entry[t]["verdict"] for t in rob["claims"])
                     + f" | {why or '-'} |")
    return lines
