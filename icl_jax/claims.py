"""The paper's four claims, checked from the numbers of an analysis of the family.

check_claims(result) takes analysis.analyze's result for the members 1l, 2l, 3l,
1l-smear, 2l-smear and 2l-mlp and gives, for each claim (co-occurrence, co-perturbation,
ablation, mechanism), a verdict: "supported", "not supported" or "inconclusive", from
checks that each carry their value, threshold and status ("pass", "fail",
"unmeasurable", or "shown": reported beside the verdict without counting). A claim is not supported when any check fails, inconclusive when none
fails but one cannot be measured (too few points, no window to measure in), supported
when every check passes. results_markdown writes that as results.md. The thresholds are
THRESHOLDS below, named in docs/reproducing.md ("The claims") and in claims.json.
"""
from __future__ import annotations

import functools
import json
import math
import os

import jax
import numpy as np

from icl_jax import analysis
from icl_jax import workdir as workdir_lib

THRESHOLDS = {
    # claim 1: the best head's prefix matching covers half its rise inside the window,
    # widened by this factor each side (snapshots are 250 steps apart)
    "rise_slack": 1.5,
    # the held-out loss falls at least this many times faster (per unit ln step) inside the
    # window than over an equally long span of ln step just before it; each span needs this
    # many evaluation points
    "loss_bump": 1.5, "loss_points": 3,
    # the PCA trajectory moves at least this many times faster (distance per unit ln step)
    # inside the window than over an equally long span (in ln step) before it
    "pca_speedup": 2.0,
    # the 1L control fails only if its in-window excess (rate inside minus rate before, of
    # the loss's fall and of the PCA movement) is also at least this fraction of the
    # reference member's excess over the same window: a ratio of two tiny rates (1L's loss
    # falling 0.04 nats per ln step against 2L's ~1) is not the bump the claim is about
    "control_fraction": 0.1,
    # claim 3: the induction heads' summed attribution is at least this share of the ICL
    # gained since before the phase change, and every other head's attribution is at most
    # this fraction of the largest induction head's, at the last snapshot and at every
    # snapshot after the window
    "ablation_share": 0.5, "other_head_fraction": 0.25,
    # claim 4: a previous-token head scores above this; K-composition must exceed the
    # mean + this many sd of random matrices' (Monte Carlo, fixed seed, the run's shapes)
    "previous_token": 0.5, "k_baseline_sd": 3.0, "k_baseline_samples": 2000,
}
MULTI_LAYER = ("2l", "3l", "2l-smear", "2l-mlp")
# claim 3 is the paper's ablation argument, made on its small attention-only models; smeared
# keys are the intervention of claim 2, and 2l-smear's attributions are shown beside the
# verdict without counting toward it (docs/claims-notes.md says why)
ATTENTION_ONLY = ("2l", "3l")
SHOWN_ONLY = ("2l-smear",)


# ----------------------------------------------------------------------------- checks

def _check(member, name, value, threshold, status, note="") -> dict:
    return {"member": member, "check": name,
            "value": None if value is None else (value if isinstance(value, (str, bool))
                                                 else float(value)),
            "threshold": threshold, "status": status, "note": note}


def _status(ok: bool) -> str:
    return "pass" if ok else "fail"


def verdict(checks) -> str:
    """Any check failed: "not supported"; else any unmeasurable: "inconclusive"; else
    "supported". Checks with status "shown" are reported beside the verdict, not counted."""
    statuses = {c["status"] for c in checks if c["status"] != "shown"}
    if not statuses or "fail" in statuses:
        return "not supported"
    return "inconclusive" if "unmeasurable" in statuses else "supported"


def _window(pc) -> tuple[float, float] | None:
    return (pc["start_step"], pc["end_step"]) if pc.get("detected") else None


# ----------------------------------------------------------------------------- measurements

def rise_step(steps, values, frac: float = 0.5):
    """First step where `values` has covered `frac` of its rise from its first value to its max."""
    v = np.asarray(values, np.float64)
    target = v[0] + frac * (v.max() - v[0])
    return int(np.asarray(steps)[int(np.argmax(v >= target))])


def loss_bump(metrics, window, min_points: int = THRESHOLDS["loss_points"]):
    """(ratio, note) of loss_fall_rates: inside over before; None where unmeasurable."""
    inside, before, note = loss_fall_rates(metrics, window, min_points)
    return (None if inside is None else inside / before), note


def loss_fall_rates(metrics, window, min_points: int = THRESHOLDS["loss_points"]):
    """(inside, before, note): how fast the held-out loss falls per unit ln(step) inside
    the window (start, end) and over an equally long span of ln(step) just before it,
    [start^2 / end, start] (least-squares slopes of the loss logged at evaluation steps
    against ln step). On a log axis, as the paper plots it, early training's fast fall is
    compressed and the bump stands out from the trend; on a linear axis a window that opens
    early would be compared with the first steps' fall. Rates None (unmeasurable) when
    either span has fewer than `min_points` evaluation points or the loss does not fall
    before the window."""
    recs = [(r["step"], r["eval_loss"]) for r in metrics
            if r.get("eval_loss") is not None and r["step"] > 0]
    if not recs:
        return None, None, "no held-out loss logged"
    s, l = (np.asarray(v, np.float64) for v in zip(*recs))
    start, end = max(window[0], 1), max(window[1], window[0] + 1, 2)

    def fall_rate(a, b):
        m = (s >= a) & (s <= b)
        return (-float(np.polyfit(np.log(s[m]), l[m], 1)[0]), int(m.sum())) \
            if m.sum() >= min_points else (None, int(m.sum()))

    before, n_before = fall_rate(start * start / end, start)
    inside, n_inside = fall_rate(start, end)
    if before is None or inside is None:
        return None, None, (f"{n_before} evaluation points before the window and {n_inside} "
                            f"in it (< {min_points})")
    if before <= 0:
        return None, None, "the loss does not fall before the window: no rate to compare with"
    return inside, before, (f"fall {inside:.3f} nats per ln step in the window, "
                            f"{before:.3f} before")


def pca_speedup(points, steps, window):
    """(ratio, note) of pca_rates: inside over before; None where unmeasurable."""
    inside, before, note = pca_rates(points, steps, window)
    return (None if inside is None else inside / before), note


def pca_rates(points, steps, window):
    """(inside, before, note): how far the PCA trajectory moves per unit ln(step) across the window
    against across an equally long span of ln(step) just before it; the points are
    interpolated linearly in ln(step) at the spans' edges, and each distance is the chord
    between them (a path length would count the snapshots' jitter, and later spans hold
    more snapshots per ln step). None (unmeasurable) when the span before the window starts
    before the first snapshot after step 0."""
    P = np.asarray(points, np.float64)
    st = np.asarray(steps, np.float64)
    keep = st > 0
    P, x = P[keep], np.log(st[keep])
    start, end = window
    a, b = math.log(max(start, 1)), math.log(max(end, 1))
    lo = a - (b - a)
    if len(x) < 2 or lo < x[0] or b > x[-1]:
        return None, None, "the span before the window starts before the first snapshot"
    at = lambda v: np.array([np.interp(v, x, P[:, k]) for k in range(P.shape[1])])
    w = b - a
    inside, before = np.linalg.norm(at(b) - at(a)) / w, np.linalg.norm(at(a) - at(lo)) / w
    if before <= 0:
        return None, None, "the trajectory does not move before the window"
    return float(inside), float(before), (f"{inside:.3g} per ln step in the window, "
                                          f"{before:.3g} before")


def _interp_ln(steps, values, step):
    s = np.log(np.maximum(np.asarray(steps, np.float64), 1))
    return float(np.interp(math.log(max(step, 1)), s, np.asarray(values, np.float64)))


def icl_drop_over(run, window):
    """(drop, threshold) of the raw ICL score across `window`, the threshold as the phase-change
    rule's: max(min_drop, noise_factor x the standard error of the change), paired over the
    evaluation examples when the run has each example's score (icl_by_example), else
    sqrt(se_start^2 + se_end^2) of the snapshots' own standard errors, with the model's
    wobble between snapshots (the rule's `wobble`) in quadrature."""
    rule = run["phase_change"]["rule"]
    start, end = window
    drop = _interp_ln(run["steps"], run["icl_score"], start) - _interp_ln(
        run["steps"], run["icl_score"], end)
    factor, se = rule.get("noise_factor", 0.0), run.get("icl_se")
    if run.get("icl_by_example") is not None:
        steps = np.asarray(run["steps"], np.float64)
        keep = steps > 0  # the rule's log axis leaves step 0 out
        noise = factor * analysis.paired_standard_error(
            np.log(steps[keep]), np.asarray(run["icl_by_example"])[keep],
            math.log(max(start, 1)), math.log(max(end, 1)))
    elif se is not None:
        noise = factor * math.hypot(_interp_ln(run["steps"], se, start),
                                    _interp_ln(run["steps"], se, end))
    else:
        noise = 0.0
    # and the model's own wobble between snapshots, as the rule counts it
    wobble = run["phase_change"].get("wobble") or 0.0
    noise = math.hypot(noise, factor * math.sqrt(2) * wobble)
    return drop, max(rule["min_drop"], noise)


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


def _model(run) -> dict:
    """The run's model config: run["model"] when given (tests), else the workdir's config."""
    if "model" in run:
        return run["model"]
    return workdir_lib.read_config_dict(run["workdir"])["model"]


def _d_head(model) -> int:
    return int(model.get("d_head") or model["d_model"] // model["n_heads"])


# ----------------------------------------------------------------------------- rows

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
    speed = pca_speedup(traj["points"], traj["steps"], _window(pc))[0] \
        if traj and pc["detected"] else None
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
        "PCA speed-up in window": "-" if speed is None else f"{speed:.1f}x",
    }


# ----------------------------------------------------------------------------- claims

def _claim1(runs, pca, metrics, t) -> list[dict]:
    checks = []
    for n in MULTI_LAYER:
        if n not in runs:
            checks.append(_check(n, "member trained", None, None, "unmeasurable", "not in this run"))
            continue
        run = runs[n]
        pc, win = run["phase_change"], _window(run["phase_change"])
        checks.append(_check(n, "ICL phase change (drop, nats)", pc["drop"] if win else None,
                             pc.get("drop_threshold"), _status(bool(win)),
                             "" if win else pc["reason"]))
        # a layer-0 head can only match prefixes with smeared keys (claim 2's point)
        smear = _model(run).get("smear_keys", False)
        first = 0 if smear else 1
        pm = np.asarray(run["prefix_matching"])[:, first:].max(axis=(1, 2))
        label = f"prefix matching of layers >= {first} rises in the window (slack {t['rise_slack']}x)"
        if pm.max() <= run["thresholds"]["prefix_matching"]:
            checks.append(_check(n, label, float(pm.max()), run["thresholds"]["prefix_matching"],
                                 "fail", "no head there reaches the induction threshold"))
        elif not win:
            checks.append(_check(n, label, None, None, "unmeasurable", "no window"))
        else:
            r = rise_step(run["steps"], pm)
            ok = win[0] / t["rise_slack"] <= r <= win[1] * t["rise_slack"]
            checks.append(_check(n, label, r, [win[0] / t["rise_slack"], win[1] * t["rise_slack"]],
                                 _status(ok), f"half of the rise to {pm.max():.2f} at step {r}"))
        label = "held-out loss falls faster in the window than before (ratio)"
        if not win:
            checks.append(_check(n, label, None, t["loss_bump"], "unmeasurable", "no window"))
        else:
            ratio, note = loss_bump(metrics[n], win)
            checks.append(_check(n, label, ratio, t["loss_bump"],
                                 "unmeasurable" if ratio is None else _status(ratio >= t["loss_bump"]),
                                 note))
        label = "PCA trajectory moves faster in the window than before (ratio)"
        traj = pca["trajectories"].get(n)
        if not win or not traj:
            checks.append(_check(n, label, None, t["pca_speedup"], "unmeasurable",
                                 "no window" if not win else "no shared PCA"))
        else:
            ratio, note = pca_speedup(traj["points"], traj["steps"], win)
            checks.append(_check(n, label, ratio, t["pca_speedup"],
                                 "unmeasurable" if ratio is None else _status(ratio >= t["pca_speedup"]),
                                 note))
    # the control: 1L over the 2L model's window (3L's if 2L has none) must show none of it
    ref = next((m for m in ("2l", "3l") if m in runs and runs[m]["phase_change"]["detected"]), None)
    if "1l" not in runs:
        checks.append(_check("1l", "control trained", None, None, "unmeasurable", "not in this run"))
        return checks
    run = runs["1l"]
    checks.append(_check("1l", "no phase change of its own", run["phase_change"]["detected"], False,
                         _status(not run["phase_change"]["detected"]),
                         run["phase_change"]["reason"]))
    checks.append(_check("1l", "no induction head", len(run["induction_heads"]), 0,
                         _status(not run["induction_heads"])))
    if ref is None:
        checks.append(_check("1l", "control window", None, None, "unmeasurable",
                             "neither 2l nor 3l has a window to measure 1l over"))
        return checks
    win = _window(runs[ref]["phase_change"])
    drop, thr = icl_drop_over(run, win)
    checks.append(_check("1l", f"ICL drop over {ref}'s window {win[0]}-{win[1]} below the "
                               "detection threshold", drop, thr, _status(drop < thr)))
    if "1l" in metrics:
        own = loss_fall_rates(metrics["1l"], win)
        theirs = loss_fall_rates(metrics[ref], win) if ref in metrics else (None, None, "")
        checks.append(_control("held-out loss bump", ref, win, own, theirs, t["loss_bump"], t))
    rates = {}
    for n in ("1l", ref):
        traj = pca["trajectories"].get(n)
        rates[n] = pca_rates(traj["points"], traj["steps"], win) if traj else (None, None, "no PCA")
    checks.append(_control("PCA speed-up", ref, win, rates["1l"], rates[ref],
                           t["pca_speedup"], t))
    return checks


def _control(signal, ref, win, own, theirs, threshold, t) -> dict:
    """The 1L control's check of one signal over the reference member's window: it fails
    when 1L's rate inside over before reaches `threshold` (the members' own test) and its
    excess (inside minus before) is also at least t["control_fraction"] of the reference's
    excess; own and theirs are (inside, before, note) rates."""
    label = (f"{signal} over {ref}'s window {win[0]}-{win[1]}: below {threshold}x, or its excess "
             f"below {t['control_fraction']} of {ref}'s")
    (inside, before, note), (r_in, r_before, _) = own, theirs
    if inside is None:
        return _check("1l", label, None, threshold, "unmeasurable", note)
    ratio = inside / before
    if ratio < threshold:
        return _check("1l", label, ratio, threshold, "pass", note)
    if r_in is None or r_in - r_before <= 0:
        return _check("1l", label, ratio, threshold, "fail",
                      f"{note}; {ref} has no excess over the window to compare with")
    fraction = (inside - before) / (r_in - r_before)
    return _check("1l", label, ratio, threshold, _status(fraction < t["control_fraction"]),
                  f"{note}; excess {inside - before:.3g} per ln step = {fraction:.3f} of "
                  f"{ref}'s {r_in - r_before:.3g}")


def _claim2(runs) -> list[dict]:
    checks = []
    if "1l-smear" not in runs:
        checks.append(_check("1l-smear", "member trained", None, None, "unmeasurable",
                             "not in this run"))
    else:
        s1 = runs["1l-smear"]
        checks.append(_check("1l-smear", "ICL phase change", s1["phase_change"]["drop"]
                             if s1["phase_change"]["detected"] else None,
                             s1["phase_change"].get("drop_threshold"),
                             _status(s1["phase_change"]["detected"]), s1["phase_change"]["reason"]))
        checks.append(_check("1l-smear", "induction heads", len(s1["induction_heads"]), ">= 1",
                             _status(bool(s1["induction_heads"]))))
    label = "2l-smear's window starts before 2l's (start steps)"
    if "2l-smear" not in runs or "2l" not in runs:
        checks.append(_check("2l-smear", label, None, None, "unmeasurable",
                             "2l or 2l-smear is not in this run"))
        return checks
    a, b = runs["2l-smear"]["phase_change"], runs["2l"]["phase_change"]
    if not a["detected"]:  # smeared keys gave 2L no phase change at all: the claim fails
        checks.append(_check("2l-smear", label, None, b["start_step"], "fail",
                             f"2l-smear has no phase change ({a['reason']})"))
    elif not b["detected"]:  # nothing to be earlier than: not evidence either way
        checks.append(_check("2l-smear", label, a["start_step"], None, "unmeasurable",
                             f"2l has no phase change to compare with ({b['reason']})"))
    else:
        checks.append(_check("2l-smear", label, a["start_step"], b["start_step"],
                             _status(a["start_step"] < b["start_step"])))
    return checks


def _attribution_checks(abl_LH, ind, gained, t):
    """(induction heads' summed attribution / ICL gained, largest other head's attribution /
    largest induction head's)."""
    abl = np.asarray(abl_LH, np.float64)
    mask = np.zeros(abl.shape, bool)
    for l, h in ind:
        mask[l, h] = True
    top = abl[mask].max()
    share = abl[mask].sum() / gained if gained > 0 else None
    # signed: a head whose removal makes the score *better* (a background head that raises
    # the early index's loss more than the late one's) does not carry in-context learning
    if not (~mask).any():
        return share, 0.0
    return share, (abl[~mask].max() / top if top > 0 else None)


def _claim3(runs, t) -> list[dict]:
    checks = []
    for n in ATTENTION_ONLY + SHOWN_ONLY:
        if n not in runs and n in SHOWN_ONLY:
            continue
        if n not in runs:
            checks.append(_check(n, "member trained", None, None, "unmeasurable", "not in this run"))
            continue
        run = runs[n]
        ind, pc = run["induction_heads"], run["phase_change"]
        if not ind:
            checks.append(_check(n, "induction heads to ablate", 0, ">= 1", "fail"))
            continue
        if not pc["detected"]:
            checks.append(_check(n, "ICL gained since before the phase change", None, None,
                                 "unmeasurable", "no phase change to measure the gain from"))
            continue
        steps = np.asarray(run["steps"])
        after = [i for i in range(len(steps)) if steps[i] > pc["end_step"]]
        if not after:
            checks.append(_check(n, "snapshots after the window", 0, ">= 1", "unmeasurable"))
            continue
        shares, others = [], []
        for i in after:
            gained = pc["icl_before"] - run["icl_score"][i]
            share, other = _attribution_checks(run["ablation_icl"][i], ind, gained, t)
            shares.append(share)
            others.append(other)
        names = ", ".join(f"L{a}H{b}" for a, b in ind)
        last_share, last_other = shares[-1], others[-1]
        checks.append(_check(n, f"last snapshot: {names}' summed attribution / ICL gained",
                             last_share, t["ablation_share"], "unmeasurable" if last_share is None
                             else _status(last_share >= t["ablation_share"])))
        checks.append(_check(n, "last snapshot: largest other head's attribution / largest "
                                "induction head's", last_other, t["other_head_fraction"],
                             "unmeasurable" if last_other is None
                             else _status(last_other <= t["other_head_fraction"])))
        valid = [s for s in shares if s is not None]
        worst = min(valid) if valid else None
        checks.append(_check(n, f"every snapshot after the window ({len(after)}): smallest share",
                             worst, t["ablation_share"], "unmeasurable" if worst is None
                             else _status(worst >= t["ablation_share"])))
        valid = [o for o in others if o is not None]
        worst = max(valid) if valid else None
        checks.append(_check(n, f"every snapshot after the window ({len(after)}): largest other "
                                "head's fraction", worst, t["other_head_fraction"],
                             "unmeasurable" if worst is None
                             else _status(worst <= t["other_head_fraction"])))
    for c in checks:  # shown beside the verdict, not counted (SHOWN_ONLY)
        if c["member"] in SHOWN_ONLY:
            c["note"] = (f"{c['status']}; shown, not counted: smeared keys are claim 2's "
                         "intervention, the paper ablates vanilla models" +
                         (f"; {c['note']}" if c["note"] else ""))
            c["status"] = "shown"
    return checks


def _claim4(runs, t) -> list[dict]:
    n = "2l"
    if n not in runs:
        return [_check(n, "member trained", None, None, "unmeasurable", "not in this run")]
    run = runs[n]
    pm, cp = np.asarray(run["prefix_matching"][-1]), np.asarray(run["copying"][-1])
    later = [(l, h) for l, h in run["induction_heads"] if l >= 1]
    if not later:
        where = ", ".join(f"L{l}H{h}" for l, h in run["induction_heads"]) or "none"
        return [_check(n, "induction head in layer >= 1", 0, ">= 1", "fail",
                       f"induction heads: {where}; a layer-0 head cannot K-compose with anything")]
    l1, h1 = max(later, key=lambda lh: pm[lh])
    checks = [_check(n, "induction head in layer >= 1", f"L{l1}H{h1}", ">= 1 head", "pass",
                     f"prefix matching {pm[l1, h1]:.2f}")]
    prev = np.asarray(run["previous_token"][-1])[:l1]  # the earlier layers
    lp, hp = np.unravel_index(int(np.argmax(prev)), prev.shape)
    checks.append(_check(n, f"previous-token head in an earlier layer (L{lp}H{hp})",
                         prev[lp, hp], t["previous_token"],
                         _status(prev[lp, hp] > t["previous_token"])))
    k_into = np.asarray(run["composition"]["k"][-1])[:l1, :, l1, h1]  # [earlier L, H]
    others = k_into.copy()
    others[lp, hp] = -np.inf
    checks.append(_check(n, f"K-composition L{lp}H{hp} -> L{l1}H{h1} is the largest from "
                            "earlier-layer heads", k_into[lp, hp],
                         float(others.max()) if np.isfinite(others.max()) else None,
                         _status(k_into[lp, hp] > others.max())))
    model = _model(run)
    mean, sd = k_composition_baseline(int(model["d_model"]), _d_head(model),
                                      t["k_baseline_samples"])
    base = mean + t["k_baseline_sd"] * sd
    checks.append(_check(n, f"K-composition L{lp}H{hp} -> L{l1}H{h1} above random matrices' "
                            f"mean + {t['k_baseline_sd']:g} sd", k_into[lp, hp], base,
                         _status(k_into[lp, hp] > base),
                         f"random: {mean:.3f} +- {sd:.3f} (d_model {model['d_model']}, "
                         f"d_head {_d_head(model)}, {t['k_baseline_samples']} samples, seed 0)"))
    checks.append(_check(n, f"copying score of L{l1}H{h1}", cp[l1, h1], 0.0,
                         _status(cp[l1, h1] > 0)))
    return checks


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


FAMILY = ("1l", "2l", "3l", "1l-smear", "2l-smear", "2l-mlp")


def load_saved(folders) -> dict:
    """analysis.analyze's result (runs and a shared PCA) rebuilt from analyses saved on disk,
    possibly made on different machines (members trained on two GPU loans, say): each folder
    holds <member>/scores.json for some of FAMILY, as `analyze --out` writes them. A member's
    run folder (config.json, metrics.jsonl) is its recorded workdir where that exists here,
    else <folder>/../<member> (a run copied back without its snapshots). The phase change is
    found again and one PCA fitted over all members, with the code as it stands; members of
    one family share the evaluation set, so their per-token losses line up."""
    runs = {}
    for folder in folders:
        # analyze of several runs writes <member>/scores.json, of a single run scores.json
        paths = [os.path.join(folder, n, "scores.json") for n in FAMILY]
        for path in filter(os.path.exists, paths + [os.path.join(folder, "scores.json")]):
            with open(path) as f:
                run = json.load(f)
            name = os.path.basename(os.path.dirname(path)) if path in paths else run["name"]
            if name not in FAMILY:
                continue
            if name in runs:
                raise ValueError(f"{name} has scores in two of the folders given "
                                 f"({runs[name]['scores_file']} and {path}); give one")
            homes = [run.get("workdir"), os.path.join(folder, os.pardir, name)]
            home = next((h for h in homes if h and os.path.exists(os.path.join(h, "config.json"))),
                        None)
            if home is None:
                raise FileNotFoundError(f"no run folder (config.json) for {name}: looked in "
                                        f"{', '.join(h for h in homes if h)}")
            run.update(workdir=os.path.normpath(home), scores_file=path)
            run["phase_change"] = analysis.phase_change_of(run)
            runs[name] = run
    if not runs:
        raise FileNotFoundError(f"no <member>/scores.json of {', '.join(FAMILY)} in "
                                f"{', '.join(map(str, folders))}")
    return {"runs": runs, "pca": analysis.shared_pca(runs)}


def check_claims(result: dict, metrics: dict | None = None, thresholds: dict | None = None
                 ) -> tuple[list[dict], list[dict]]:
    """(rows per member, the four claims) from an analysis of the family (analysis.analyze's
    result: "runs" {name: what scores.json holds}, "pca"). metrics: {name: [{"step",
    "eval_loss"}, ...]} for the loss bump; read from each run's workdir when not given."""
    t = {**THRESHOLDS, **(thresholds or {})}
    runs, pca = result["runs"], result["pca"]
    if metrics is None:
        metrics = {n: workdir_lib.read_metrics(r["workdir"]) for n, r in runs.items()}
    rows = [_row(n, r, pca["trajectories"].get(n)) for n, r in runs.items()]
    found = []
    for title, checks in (("1. Co-occurrence", _claim1(runs, pca, metrics, t)),
                          ("2. Co-perturbation", _claim2(runs)),
                          ("3. Ablation", _claim3(runs, t)),
                          ("4. Mechanism", _claim4(runs, t))):
        v = verdict(checks)
        found.append({"claim": title, "verdict": v, "holds": v == "supported",
                      "checks": checks, "evidence": _evidence(checks)})
    return rows, found


def results_markdown(rows, claims, profile, train_seconds=0.0, analysis_seconds=0.0,
                     provenance: str | None = None) -> str:
    """results.md; provenance, where given, says where the numbers came from in place of
    the training and analysis times (claims checked again from saved analyses)."""
    cols = list(rows[0])
    lines = [f"# Results: profile `{profile}`", "",
             provenance or (f"Trained in {train_seconds / 60:.1f} minutes (all members) and "
                            f"analysed in {analysis_seconds / 60:.1f} ({jax.device_count()} "
                            f"{jax.devices()[0].platform} device(s))."), "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "## The paper's claims", "",
              "Each check: value vs threshold, pass / FAIL / UNMEASURABLE, or SHOWN (reported "
              "beside the verdict, not counted, with its own pass or fail in the note). A "
              "claim is not supported when a check fails, inconclusive when one cannot be "
              "measured.", ""]
    lines += [f"- **{c['claim']}: {c['verdict']}.** {c['evidence']}" for c in claims]
    return "\n".join(lines) + "\n"


def write_results(out, rows, claims, text: str):
    """results.md (text) and claims.json (rows and claims) into the folder `out`."""
    out = workdir_lib.path(out)
    workdir_lib.write_text(out / "results.md", text)
    workdir_lib.write_text(out / "claims.json", json.dumps({"rows": rows, "claims": claims},
                                                           indent=1))
