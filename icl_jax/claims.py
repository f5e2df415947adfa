"""The paper's four claims, checked from the numbers of an analysis of the family.

check_claims(result) takes analysis.analyze's result for the members 1l, 2l, 3l,
1l-smear, 2l-smear and 2l-mlp and says, for each claim (co-occurrence, co-perturbation,
ablation, mechanism), whether this run supports it and why; results_markdown writes
that as results.md. The rules are stated in README.md ("Reproducing the paper").
"""
from __future__ import annotations

import jax
import numpy as np

from icl_jax import scores, workdir as workdir_lib


def _window_hit(step, pc, slack: float = 1.5) -> bool:
    """Is `step` inside the phase-change window, widened by a factor `slack` each side?"""
    return (step is not None and pc["detected"]
            and pc["start_step"] / slack <= step <= pc["end_step"] * slack)


def _rise_step(steps, values, frac: float = 0.5):
    """First step where `values` has covered `frac` of its rise from start to max."""
    v = np.asarray(values, np.float64)
    target = v[0] + frac * (v.max() - v[0])
    idx = int(np.argmax(v >= target))
    return int(steps[idx])


def loss_bump(metrics, pc) -> float | None:
    """How much faster the loss falls inside the phase-change window than over an equally
    long span just before it (a ratio; the paper's "bump" is a ratio > 1.5).

    The loss is the held-out loss logged at evaluation steps: an estimate of the training
    loss without the noise of single batches, which swamps the slopes.
    """
    if not pc["detected"]:
        return None
    recs = [(r["step"], r["eval_loss"]) for r in metrics if r.get("eval_loss") is not None]
    s, l = (np.asarray(v, np.float64) for v in zip(*recs))
    start, end = pc["start_step"], pc["end_step"]
    width = max(end - start, 1)

    def fall_rate(a, b):  # least-squares slope: single-batch losses are noisy
        m = (s >= a) & (s <= b)
        return -float(np.polyfit(s[m], l[m], 1)[0]) if m.sum() >= 3 else float("nan")

    before = fall_rate(start - width, start)
    inside = fall_rate(start, end)
    return inside / before if before > 0 else float("inf") if inside > 0 else None


def ablate_set_icl(last, heads, reference: float = 0.0, kind: str = "pattern") -> dict:
    """ICL score at the last snapshot (an analysis.LastSnapshot), clean and with every head
    in `heads` removed at once.

    share_removed: how much of the in-context learning gained since `reference` (the
    ICL score before the phase change, or 0) the ablation takes away; 1 is all of it.
    """
    cfg = last.run.config
    L, H = cfg.model.n_layers, cfg.model.n_heads
    mask = np.ones((L, H), np.float32)
    for l, h in heads:
        mask[l, h] = 0.0
    clean, ablated = scores.icl_with_heads_removed(
        last.run.model, last.params, last.inputs["eval_BT1"], cfg.eval.icl_early_index,
        cfg.eval.icl_late_index, mask, kind)
    return {"clean": float(clean), "ablated": float(ablated),
            "share_removed": (float((ablated - clean) / (reference - clean))
                              if reference - clean > 1e-6 else None)}


def check_claims(result: dict) -> tuple[list[dict], list[dict]]:
    """(rows per member, the four claims) computed from an analysis of the family
    (analysis.analyze's result: the ablations run on the last snapshots it kept)."""
    runs = result["runs"]
    rows, info = [], {}
    for name, run in runs.items():
        wd, last = run["workdir"], result["last"][name]
        pc = run["phase_change"]
        pm = np.asarray(run["prefix_matching"])  # [N, L, H]
        cp = np.asarray(run["copying"])
        last_pm = pm[-1]
        l, h = last_pm.shape[0] - 1, int(np.argmax(last_pm[-1]))
        ind = run["induction_heads"]
        others = [[a, b] for a in range(last_pm.shape[0]) for b in range(last_pm.shape[1])
                  if [a, b] not in ind]
        ref = pc["icl_before"] if pc["detected"] else 0.0
        abl = ablate_set_icl(last, ind, ref) if ind else None
        abl_other = ablate_set_icl(last, others, ref) if ind and others else None
        traj = result["pca"]["trajectories"].get(name)
        turn = traj if traj else {"turn_deg": None}
        metrics = workdir_lib.read_metrics(wd)
        pm_last_layer = pm[:, -1].max(-1)
        info[name] = {
            "pc": pc, "ind": ind, "abl": abl, "abl_other": abl_other, "turn": turn,
            "pm_rise": _rise_step(run["steps"], pm_last_layer) if pm_last_layer.max() > 0.3
            else None,
            "loss_bump": loss_bump(metrics, pc),
            "best": (int(l), int(h), float(last_pm[l, h]), float(cp[-1][l, h])),
            "copying_last": cp[-1],
            "prev_token": np.asarray(run["previous_token"])[-1],
            "k_comp": np.asarray(run["composition"]["k"])[-1] if "composition" in run else None,
        }
        rows.append({
            "model": name,
            "phase change": (f"steps {pc['start_step']:,}-{pc['end_step']:,} "
                             f"({pc['start_tokens'] / 1e6:.1f}M-{pc['end_tokens'] / 1e6:.1f}M tokens)"
                             if pc["detected"] else "none"),
            "ICL before -> after": (f"{pc['icl_before']:+.2f} -> {pc['icl_after']:+.2f}"
                                    if pc["detected"] else f"{run['icl_score'][-1]:+.2f} (last)"),
            "best last-layer head (prefix, copying)":
                f"L{l}H{h} ({last_pm[l, h]:.2f}, {cp[-1][l, h]:+.2f})",
            "induction heads": ", ".join(f"L{a}H{b}" for a, b in ind) or "none",
            "ICL removed by ablating them": (f"{abl['share_removed']:.0%}"
                                             if abl and abl["share_removed"] is not None else "-"),
            "PCA turns": ("-" if turn["turn_deg"] is None else
                          f"{'yes' if turn['turn_deg'] > 45 else 'no'} ({turn['turn_deg']:.0f} deg)"),
        })
    return rows, _claims(info)


def _claims(info) -> list[dict]:
    def has(name):
        return name in info

    claims = []
    # 1. co-occurrence
    multi = [n for n in ("2l", "3l") if has(n)]
    parts, ok = [], bool(multi)
    for n in multi:
        i = info[n]
        hits = {"ICL phase change": i["pc"]["detected"],
                "last-layer prefix matching rises in it": _window_hit(i["pm_rise"], i["pc"]),
                f"held-out loss falls {i['loss_bump'] or 0:.1f}x faster in it than before":
                    (i["loss_bump"] or 0) > 1.5,
                f"PCA trajectory turns {i['turn']['turn_deg'] or 0:.0f} deg (> 45)":
                    (i["turn"]["turn_deg"] or 0) > 45}
        ok &= all(hits.values())
        parts.append(f"{n}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in hits.items()))
    if has("1l"):
        i = info["1l"]
        none = not i["pc"]["detected"] and not i["ind"]
        ok &= none
        parts.append(f"1l: {'no phase change and no induction head' if none else 'shows a phase change or induction heads'}")
    claims.append({"claim": "1. Co-occurrence", "holds": ok, "evidence": "; ".join(parts)})

    # 2. co-perturbation
    parts, ok = [], has("1l-smear") and has("2l-smear") and has("2l")
    if ok:
        s1 = info["1l-smear"]
        one = s1["pc"]["detected"] and bool(s1["ind"])
        a, b = info["2l-smear"]["pc"], info["2l"]["pc"]
        earlier = a["detected"] and b["detected"] and a["start_step"] < b["start_step"]
        ok = one and earlier
        parts.append(f"1l-smear: {'phase change and induction heads' if one else 'NO phase change or induction head'}")
        parts.append(f"2l-smear phase change at step {a['start_step']} vs 2l at {b['start_step']}: "
                     f"{'earlier' if earlier else 'NOT earlier'}")
    claims.append({"claim": "2. Co-perturbation", "holds": ok, "evidence": "; ".join(parts)})

    # 3. ablation
    ok, parts = False, []
    if has("2l") and info["2l"]["abl"]:
        i = info["2l"]
        share = i["abl"]["share_removed"] or 0.0
        other = (i["abl_other"] or {}).get("share_removed") or 0.0
        ok = share > 0.5 and other < share
        parts.append(f"2l: ablating its induction heads (pattern-preserving) removes {share:.0%} of "
                     f"the ICL gained since before the phase change (final ICL score "
                     f"{i['abl']['clean']:+.2f} -> {i['abl']['ablated']:+.2f}; before the phase "
                     f"change {i['pc']['icl_before']:+.2f}); ablating all other heads removes "
                     f"{other:.0%}")
    else:
        parts.append("2l has no induction heads to ablate")
    claims.append({"claim": "3. Ablation", "holds": ok, "evidence": "; ".join(parts)})

    # 4. mechanism
    ok, parts = False, []
    if has("2l") and info["2l"]["ind"] and info["2l"]["k_comp"] is not None:
        i = info["2l"]
        l1, h1 = i["ind"][0]
        prev = i["prev_token"][0]  # layer 0
        p_head = int(np.argmax(prev))
        k_into = i["k_comp"][0, :, l1, h1]  # every layer-0 head into the induction head
        copying = float(i["copying_last"][l1, h1])  # the induction head's own
        copying_ok = copying > 0
        ok = (prev[p_head] > 0.5 and int(np.argmax(k_into)) == p_head and copying_ok)
        parts.append(f"2l: layer-0 previous-token head L0H{p_head} (score {prev[p_head]:.2f}); "
                     f"K-composition into L{l1}H{h1} is {'largest' if int(np.argmax(k_into)) == p_head else 'NOT largest'} "
                     f"from it ({k_into[p_head]:.2f} vs max of others "
                     f"{np.delete(k_into, p_head).max() if len(k_into) > 1 else 0:.2f}); "
                     f"induction head copying score {copying:+.2f}")
    else:
        parts.append("2l has no induction head to read the circuit from")
    claims.append({"claim": "4. Mechanism", "holds": ok, "evidence": "; ".join(parts)})
    return claims


def results_markdown(rows, claims, profile, train_seconds, analysis_seconds) -> str:
    cols = list(rows[0])
    lines = [f"# Results: profile `{profile}`", "",
             f"Trained in {train_seconds / 60:.1f} minutes (all members) and analysed in "
             f"{analysis_seconds / 60:.1f} ({jax.device_count()} "
             f"{jax.devices()[0].platform} device(s)).", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += ["", "## The paper's claims", ""]
    lines += [f"- **{c['claim']}: {'supported' if c['holds'] else 'NOT supported'}.** {c['evidence']}"
              for c in claims]
    return "\n".join(lines) + "\n"
