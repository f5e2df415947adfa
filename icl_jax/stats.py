"""The statistics the paper's figures are read with: the phase-change rule, the noise a
change of the ICL score is weighed against, the per-token-loss PCA and its pivot.

Pure numpy on saved numbers (no jax, no files): analysis.py feeds them a run's scores,
claims.py judges the paper's claims with them, and they are usable on their own on any
curve. Every function here is tested on curves whose answer is known by construction
(tests/test_phase_change.py).
"""
from __future__ import annotations

import math

import numpy as np

# The widest phase change the rule accepts, in ln(step): the paper's own window in its small
# models spans "approximately 1-3 billion tokens", a factor of 3 (ln 3 = 1.10).
PAPER_WINDOW_WIDTH = math.log(3.0)
# A phase change's onset: where the ICL score's rate of fall first exceeds this fraction of its
# peak, before the window (rate above `frac` of it) opens; ~1% of a logistic fall is done there
ONSET_FRAC = 0.05


# ----------------------------------------------------------------------------- noise

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
    d = interpolate_rows(x, E, xb) - interpolate_rows(x, E, xa)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def interpolate_rows(x, rows_SX, v: float) -> np.ndarray:
    """rows_SX [S, ...] interpolated linearly at v between the rows at positions x [S]
    (increasing); clamped to the first and last row outside them."""
    rows = np.asarray(rows_SX, np.float64)
    x = np.asarray(x, np.float64)
    if len(x) == 1:
        return rows[0]
    i = int(np.clip(np.searchsorted(x, v), 1, len(x) - 1))
    w = float(np.clip((v - x[i - 1]) / (x[i] - x[i - 1]), 0.0, 1.0))
    return (1 - w) * rows[i - 1] + w * rows[i]


def wobble(icl) -> float:
    """How much the model itself moves the ICL score from one snapshot to the next (SGD's
    noise, which no evaluation set removes): 1.4826 x the median absolute deviation of the
    snapshot-to-snapshot changes, over sqrt(2); 0 with fewer than 5 snapshots."""
    changes = np.diff(np.asarray(icl, np.float64))
    if len(changes) < 4:
        return 0.0
    return 1.4826 * float(np.median(np.abs(changes - np.median(changes)))) / math.sqrt(2)


def change_noise(x, xa: float, xb: float, *, icl_by_example=None, icl_se=None,
                 wobble_: float = 0.0) -> float:
    """The standard error of the ICL score's change from xa to xb (positions on the axis x
    of the snapshots): the evaluation set's, paired when each example's score is given
    (paired_standard_error), else sqrt(se_a^2 + se_b^2) of the snapshots' own standard
    errors, else 0; and training's wobble, sqrt(2) x `wobble_` for a difference of two
    snapshots; the two in quadrature."""
    if icl_by_example is not None:
        evaluation = paired_standard_error(x, icl_by_example, xa, xb)
    elif icl_se is not None:
        se = np.nan_to_num(np.asarray(icl_se, np.float64), nan=0.0)
        evaluation = math.hypot(float(np.interp(xa, x, se)), float(np.interp(xb, x, se)))
    else:
        evaluation = 0.0
    return math.hypot(evaluation, math.sqrt(2) * wobble_)


def drop_threshold(noise: float, rule: dict) -> float:
    """The smallest fall of the ICL score that counts: max(min_drop, noise_factor x the
    change's standard error `noise`), as the phase-change rule (`rule`: its parameters)
    weighs every window."""
    return max(rule["min_drop"], rule["noise_factor"] * noise)


def axis_of(steps, axis: str):
    """(keep [S] bool, x [kept]): the snapshots the rule's axis holds and their positions:
    ln(step) without step 0 (axis "log"), or step (axis "linear")."""
    steps = np.asarray(steps, np.float64)
    if axis == "log":
        keep = steps > 0
        return keep, np.log(steps[keep])
    return np.ones(len(steps), bool), steps


def to_axis(step: float, axis: str) -> float:
    return math.log(max(step, 1)) if axis == "log" else float(step)


# ----------------------------------------------------------------------------- the rule

def detect_phase_change(steps, icl, tokens=None, *, icl_se=None, icl_by_example=None,
                        axis: str = "log", smooth: float = 0.05, frac: float = 0.3,
                        min_drop: float = 0.1, noise_factor: float = 3.0,
                        min_share: float = 0.4, max_width: float = PAPER_WINDOW_WIDTH,
                        abrupt: bool = True, grid: int = 512) -> dict:
    """The training window in which the ICL score drops abruptly, by a stated rule.

    The paper's window is "selected based on the derivative of the in-context score", by
    eye; this rule makes that choice automatic:
      1. x = ln(step) (axis "log"; step 0 is left out) or step (axis "linear").
      2. Interpolate the ICL score linearly onto `grid` even points in x and smooth it
         with a Gaussian of standard deviation `smooth` (in x units; for axis
         "linear" a fraction of the step range).
      3. rate = -d(ICL)/dx. Every local maximum of rate is a candidate, steepest first;
         a candidate's window is the contiguous span around it where rate > frac x its
         rate.
      4. The drop threshold of a window is max(min_drop, noise_factor x se) (drop_threshold),
         se the standard error of the score's change across the window (change_noise): the
         evaluation set's, paired over the examples when each example's score is given,
         and training's wobble between snapshots (`wobble`), in quadrature. A drop either
         noise could make does not count.
      5. A candidate is the phase change if: its drop (smoothed score at the start minus
         at the end) is at least the threshold, and at least `min_share` of the smoothed
         curve's fall around it (from its highest point within max_width before the
         window's start to its lowest point within max_width after its end); its width,
         less the spread smoothing alone gives a step (in quadrature: 3.1 x smooth at
         frac 0.3), is at most `max_width` in x (by default ln 3: the paper's small-model
         window spans "approximately 1-3 billion tokens"; a smooth, slowly improving curve
         is spread wider; abrupt=False leaves this condition out, for a change judged on
         its timing alone); it ends before the last snapshot (the score has settled
         again); and it is not the early transient, in which the score rises while the
         model learns the background statistics and falls back: a window whose fall begins
         at the top of the rise (the smoothed score falls all the way from its highest
         point before the window's end into the window, and the window starts within
         max_width of that point) must end below zero by at least the drop threshold. Zero
         is the score of a model that predicts late tokens no better than early ones, i.e.
         has no in-context learning; the part of such a fall that only undoes the rise is
         not in-context learning. The untrained model's score is no floor: at
         initialisation it measures how the variance of random logits shrinks as attention
         averages over more positions (docs/measurements.md), not in-context learning.
      6. The first candidate that passes is reported; if none does, the steepest one's
         window is, with `reason` naming the condition it failed.
    Returns {detected, reason, start_step, end_step, peak_step, onset_step (where the fall
    begins: the rate first above ONSET_FRAC of its peak), start_tokens,
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
    rule = {"axis": axis, "smooth": smooth, "frac": frac, "min_drop": min_drop,
            "noise_factor": noise_factor, "min_share": min_share, "max_width": max_width,
            "abrupt": abrupt,
            "standard_error": "paired" if by_ex is not None else
                              "unpaired" if icl_se is not None else "none"}
    out = {"detected": False, "reason": "", "rule": rule,
           "start_step": None, "end_step": None, "peak_step": None, "onset_step": None,
           "start_tokens": None,
           "end_tokens": None, "icl_before": None, "icl_after": None, "drop": None,
           "drop_threshold": None, "se_before": None, "se_after": None, "se_drop": None,
           "wobble": None,
           "icl_first": float(icl[0]) if len(icl) else None, "candidates": 0}
    if len(steps) == 0:
        out["reason"] = "no finite ICL score"
        return out
    keep, x = axis_of(steps, axis)
    steps, icl, se = steps[keep], icl[keep], se[keep]
    if by_ex is not None:
        by_ex = by_ex[keep]
    if len(steps) < 4:
        out["reason"] = f"too few snapshots ({len(steps)}) to find a phase change"
        return out
    out["wobble"] = w_snap = wobble(icl)
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

    def edges(p):
        above = rate > frac * rate[p]
        a = b = p
        while a > 0 and above[a - 1]:
            a -= 1
        while b < grid - 1 and above[b + 1]:
            b += 1
        return a, b

    def from_top(a, top):
        """Does the window's fall begin at the top of the score's rise (`top`: the smoothed
        score's highest point before the window's end), the score falling all the way from
        it into the window, which starts within max_width of it (a rise and a fall in one
        bump, with no plateau between)?"""
        return (top <= a and xg[a] - xg[top] <= max_width
                and bool(np.all(rate[top + 1:a + 1] > 0)))

    def judge(p):
        a, b = edges(p)
        onset = a  # where the fall begins: the rate first above ONSET_FRAC of its peak
        while onset > 0 and rate[onset - 1] > ONSET_FRAC * rate[p]:
            onset -= 1
        drop = float(yg[a] - yg[b])
        noise = change_noise(x, xg[a], xg[b], icl_by_example=by_ex,
                             icl_se=None if by_ex is not None else se, wobble_=w_snap)
        threshold = drop_threshold(noise, rule)
        top = int(np.argmax(yg[:b + 1]))
        # the fall around the window: from the highest point within max_width before it to
        # the lowest within max_width after it (an earlier transient's peak stays out)
        before = (xg <= xg[a]) & (xg >= xg[a] - max_width)
        after = (xg >= xg[b]) & (xg <= xg[b] + max_width)
        total = float(yg[before].max() - yg[after].min())
        width = float(xg[b] - xg[a])
        net_width = math.sqrt(max(width ** 2 - spread ** 2, 0.0))
        w = dict(start_step=round(to_step(xg[a])), end_step=round(to_step(xg[b])),
                 peak_step=round(to_step(xg[p])), onset_step=round(to_step(xg[onset])),
                 icl_before=float(yg[a]),
                 icl_after=float(yg[b]), drop=drop, drop_threshold=threshold,
                 se_before=float(seg[a]), se_after=float(seg[b]), se_drop=float(noise))
        if drop < threshold:
            why = (f"the drop is only {drop:.3f} nats (< {threshold:.3f} = max({min_drop}, "
                   f"{noise_factor} x the standard error of the change, {noise:.3f}))")
        elif drop < min_share * total:
            why = (f"the drop ({drop:.3f}) is under {min_share:.0%} of the score's fall "
                   f"around it ({total:.3f}): a steep part of a gradual decline")
        elif abrupt and net_width > max_width:
            why = (f"the drop is spread over {width:.2f} {axis}-step units ({net_width:.2f} "
                   f"less the smoothing's own spread; > {max_width:.2f}): gradual, not abrupt")
        elif b == grid - 1:
            why = "the score is still falling at the last snapshot"
        elif from_top(a, top) and -float(yg[b]) < threshold:
            why = (f"the score falls from the top of its first rise and ends at "
                   f"{yg[b]:+.3f}, not below zero (no in-context learning) by the drop "
                   f"threshold {threshold:.3f}: the early transient, not in-context learning")
        else:
            why = ""
        return w, why

    steepest = None
    for p in peaks:
        w, why = judge(p)
        steepest = steepest or (w, why)
        if not why:
            out.update(w, detected=True, reason="abrupt drop" if abrupt else "drop")
            break
    else:
        out.update(steepest[0], reason=steepest[1])
    if tokens is not None and out["start_step"] is not None:
        tokens = np.asarray(tokens, np.float64)[order][finite][keep]
        per_step = tokens[-1] / steps[-1] if steps[-1] else 0.0
        out.update(start_tokens=round(out["start_step"] * per_step),
                   end_tokens=round(out["end_step"] * per_step))
    return out


def drop_over(steps, icl, window, rule: dict, *, icl_by_example=None, icl_se=None,
              wobble_: float | None = None) -> tuple[float, float]:
    """(drop, threshold): how far the raw ICL score falls across `window` (start, end steps;
    the score interpolated linearly on the rule's axis) and the smallest fall the phase-change
    rule `rule` would count there (drop_threshold of change_noise, with the same axis and
    noise sources). wobble_: the run's own (its phase change's "wobble"); None: estimated
    from `icl` on that axis."""
    keep, x = axis_of(steps, rule["axis"])
    y = np.asarray(icl, np.float64)[keep]
    xa, xb = to_axis(window[0], rule["axis"]), to_axis(window[1], rule["axis"])
    drop = float(np.interp(xa, x, y) - np.interp(xb, x, y))
    by_ex = None if icl_by_example is None else np.asarray(icl_by_example, np.float64)[keep]
    se = None if icl_se is None or by_ex is not None else np.asarray(icl_se, np.float64)[keep]
    noise = change_noise(x, xa, xb, icl_by_example=by_ex, icl_se=se,
                         wobble_=wobble(y) if wobble_ is None else wobble_)
    return drop, drop_threshold(noise, rule)


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


def trajectory_jitter(points_N2, steps) -> float | None:
    """The standard deviation of a PCA point's jitter about the trajectory's smooth path, per
    coordinate: from the second differences of evenly spaced snapshots (each has variance
    6 sigma^2 under independent jitter, and a smooth path adds little), 1.4826 x their
    median absolute value over sqrt(6), pooled over the coordinates. None with fewer than
    four evenly spaced triples."""
    P = np.asarray(points_N2, np.float64)
    s = np.asarray(steps, np.float64)
    h = np.diff(s)
    even = np.nonzero(np.isclose(h[1:], h[:-1]) & (h[:-1] > 0))[0]
    if len(even) < 4:
        return None
    d2 = P[even + 2] - 2 * P[even + 1] + P[even]
    return 1.4826 * float(np.median(np.abs(d2))) / math.sqrt(6)


def pca_pivot(points_N2, steps, window, *, onset: float | None = None,
              noise_factor: float = 3.0, min_turn_deg: float = 45.0) -> dict:
    """Does the per-token-loss PCA trajectory "pivot" (the paper: "the model's trajectory
    abruptly changes") at the phase change `window` (start, end steps), whose fall begins at
    `onset` (the phase change's onset_step; default the window's start)?

    On a linear step axis, as the paper plots its small models, two chords of equal length
    in steps meeting at the onset: `inside`, from the onset to the window's end, and
    `before`, over the span of the same length just before the onset (from step 0 where
    that span would open earlier). The corner is put at the onset, not at the window's
    start, so that the first part of the move (the tail of a fall before its steepest
    part) does not count as the direction the trajectory came from. A chord is motion only
    when it is longer than `noise_factor` x the length two jittered points give by chance
    (2 x trajectory_jitter: a chord between two points that each jitter by sigma per
    coordinate has rms length 2 sigma in two dimensions). Then:
      - no motion inside the window: no pivot;
      - motion inside after none before (the trajectory sets off from rest): a pivot;
      - motion in both: a pivot when the chords turn by at least `min_turn_deg`.
    A trajectory at rest (a plateau) cannot pivot, whatever angle its jitter makes.
    Returns {pivot (bool, None where unmeasurable), turn_deg (None unless both chords move),
    before, inside (chord lengths), noise (the chord length counted as motion), note}.
    """
    P = np.asarray(points_N2, np.float64)
    s = np.asarray(steps, np.float64)
    out = {"pivot": None, "turn_deg": None, "before": None, "inside": None, "noise": None,
           "note": ""}
    sigma = trajectory_jitter(P, s)
    if sigma is None or len(s) < 3:
        out["note"] = "too few evenly spaced snapshots to measure the trajectory's jitter"
        return out
    start = float(window[0] if onset is None else min(onset, window[0]))
    end = float(window[1])
    if end <= start or end > s[-1]:
        out["note"] = "the window does not lie inside the snapshots"
        return out
    lo = max(start - (end - start), float(s[0]))
    u = interpolate_rows(s, P, start) - interpolate_rows(s, P, lo)
    v = interpolate_rows(s, P, end) - interpolate_rows(s, P, start)
    noise = noise_factor * 2 * sigma
    out.update(before=float(np.linalg.norm(u)), inside=float(np.linalg.norm(v)),
               noise=float(noise))
    moves_before, moves_inside = out["before"] > noise, out["inside"] > noise
    if moves_before and moves_inside:
        cos = float(u @ v / (out["before"] * out["inside"]))
        out["turn_deg"] = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    corner = f"at step {start:,.0f}"
    if not moves_inside:
        out.update(pivot=False, note=f"no motion in the window (chord {out['inside']:.3g} "
                                     f"<= noise {noise:.3g})")
    elif not moves_before:
        out.update(pivot=True, note=f"sets off from rest {corner} (chord before "
                                    f"{out['before']:.3g} <= noise {noise:.3g}, after "
                                    f"{out['inside']:.3g})")
    else:
        out.update(pivot=out["turn_deg"] >= min_turn_deg,
                   note=f"turns {out['turn_deg']:.0f} deg {corner} (chords {out['before']:.3g}"
                        f" before, {out['inside']:.3g} after; noise {noise:.3g})")
    return out


# ----------------------------------------------------------------------------- a run's scores

def phase_change_of(scores: dict, abrupt: bool = True) -> dict:
    """detect_phase_change on a run's scores (as analysis.score_run returns them or
    scores.json holds them): the one place the rule is fed, for fresh analyses and saved
    ones alike. abrupt: False leaves the rule's width condition out (a change judged on its
    timing alone)."""
    return detect_phase_change(scores["steps"], scores["icl_score"], scores["tokens"],
                               icl_se=scores.get("icl_se"),
                               icl_by_example=scores.get("icl_by_example"), abrupt=abrupt)


def shared_pca(runs: dict) -> dict:
    """One PCA over every snapshot's per-token losses of every run ({name: scores with
    "per_token_loss", "steps" and "phase_change"}), and each run's trajectory in it, with
    its pivot at its own phase change (pca_pivot; None without one); none if the runs'
    vectors differ in length."""
    names = list(runs)
    vecs = [np.asarray(runs[n]["per_token_loss"], np.float64) for n in names]
    pca = {"trajectories": {}, "explained": [],
           "same_length": len({v.shape[1] for v in vecs}) == 1}
    if pca["same_length"]:
        fit = fit_pca(np.concatenate(vecs))
        pca["explained"] = fit["explained"].tolist()
        offsets = np.cumsum([0] + [len(v) for v in vecs])
        for i, n in enumerate(names):
            P = fit["project"][offsets[i]:offsets[i + 1]]
            pc = runs[n]["phase_change"]
            pivot = (pca_pivot(P, runs[n]["steps"], (pc["start_step"], pc["end_step"]),
                               onset=pc.get("onset_step")) if pc.get("detected") else None)
            pca["trajectories"][n] = {"steps": list(runs[n]["steps"]), "points": P.tolist(),
                                      "pivot": pivot}
    return pca
