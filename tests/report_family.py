"""A made-up analysis of the paper's family, for the report's tests: every series the report
draws, shaped as analysis.analyze gives them, with a phase change placed by hand (the real
rule, analysis.detect_phase_change, finds it) and the held-out loss bumping in it. No model
is trained, so a test of the page takes seconds."""
import copy
import json
import os
import types

import numpy as np
import pytest

from icl_jax import analysis
from conftest import tiny_config

# log-spaced early snapshots, then every 250 steps: evenly spaced indices are not these steps
STEPS = np.array([0, 1, 2, 4, 8, 16, 32, 63, 125] + list(range(250, 4001, 250)))
PER_STEP = 2048  # tokens a step
T = 32

# name: (layers, step the window is centred on or None, induction heads)
MEMBERS = {"1l": (1, None, []), "2l": (2, 1500, [[1, 2]]), "3l": (3, 1750, [[2, 0]]),
           "1l-smear": (1, 600, [[0, 1]]), "2l-smear": (2, 900, [[1, 0]]),
           "2l-mlp": (2, 2500, [[1, 3]])}


def _sigmoid_in_log(steps, centre, width=0.15):
    x = np.log(np.maximum(steps, 1)) - np.log(centre)
    return 1 / (1 + np.exp(-x / width))


def fake_run(name, layers, centre, induction, workdir, rng, heads=4):
    N = len(STEPS)
    rise = _sigmoid_in_log(STEPS, centre) if centre else np.zeros(N)
    icl = -0.1 - 0.9 * rise + rng.normal(0, 0.01, N)  # ends below the untrained score
    icl[0] = -0.7  # an untrained model's score, as low as the trained one's
    pm = rng.uniform(0.0, 0.05, (N, layers, heads))
    prev = rng.uniform(0.0, 0.1, (N, layers, heads))
    cp = rng.uniform(-0.3, 0.3, (N, layers, heads))
    abl = rng.normal(0, 0.01, (N, layers, heads))
    for l, h in induction:
        pm[:, l, h] = 0.03 + 0.9 * rise
        cp[:, l, h] = 0.2 + 0.7 * rise
        abl[:, l, h] = 0.5 * rise
    if layers > 1:
        prev[:, 0, 3] = 0.2 + 0.7 * rise
    comp = {k: rng.uniform(0, 0.15, (N, layers, heads, layers, heads)) for k in "qkv"}
    if induction and layers > 1:
        comp["k"][:, 0, 3, induction[0][0], induction[0][1]] = 0.3 * rise
    idx = np.arange(1, T + 1)
    lbp = np.stack([3.0 - r * 0.5 * np.log(idx) / np.log(T) + 0.3 * np.exp(-s / 50)
                    for r, s in zip(rise, STEPS)])
    run = {"name": name, "workdir": str(workdir), "icl_indices": {"early": 2, "late": 20},
           "ablation_kind": "pattern", "thresholds": {"prefix_matching": 0.3, "copying": 0.0},
           "steps": STEPS.tolist(), "tokens": (STEPS * PER_STEP).tolist(),
           "icl_score": icl.tolist(), "icl_se": [0.02] * N, "loss_by_position": lbp.tolist(),
           "prefix_matching": pm.tolist(), "previous_token": prev.tolist(),
           "copying": cp.tolist(), "ablation_icl": abl.tolist(),
           "composition": {k: v.tolist() for k, v in comp.items()},
           "per_token_loss": (lbp[:, :16] + rng.normal(0, 0.01, (N, 16))).tolist(),
           "induction_heads": induction}
    run["phase_change"] = analysis.detect_phase_change(run["steps"], run["icl_score"],
                                                       run["tokens"])
    return run


def write_run_folder(workdir, layers, centre, rng, mlp=False, smear=False):
    """config.json and metrics.jsonl (training and held-out loss, the latter bumping in the
    window) as a training run leaves them."""
    os.makedirs(workdir, exist_ok=True)
    c = tiny_config(f"layers={layers}").to_dict()
    c["model"].update(mlp=mlp, smear_keys=smear, context=T)
    c["train"]["steps"] = int(STEPS[-1])
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(c, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for s in range(0, int(STEPS[-1]) + 1, 50):
            ln = np.log(max(s, 1))
            held = 4.0 - 0.12 * ln - (0.4 * _sigmoid_in_log(s, centre)[()] if centre else 0)
            rec = {"step": s, "tokens": s * PER_STEP,
                   "train_loss": None if s == 0 else held + rng.normal(0, 0.03),
                   "eval_loss": held}
            f.write(json.dumps(rec) + "\n")


def fake_family(out, names=tuple(MEMBERS), seed=0, last=True) -> dict:
    """analysis.analyze's result for a made-up family whose runs live in out/<name>; `last`
    holds, for each run, what the figures need of its last snapshot (attention on a repeated
    sequence, with an induction stripe)."""
    rng = np.random.default_rng(seed)
    runs, lasts = {}, {}
    for name in names:
        layers, centre, induction = MEMBERS[name]
        wd = os.path.join(out, name)
        write_run_folder(wd, layers, centre, rng, mlp="mlp" in name, smear="smear" in name)
        runs[name] = fake_run(name, layers, centre, induction, wd, rng)
        tokens = np.concatenate([[0], np.tile(np.arange(1, 8), 5)])[:T]
        att = np.tril(rng.random((layers, 4, T, T)))
        att /= att.sum(-1, keepdims=True)
        lasts[name] = types.SimpleNamespace(step=int(STEPS[-1]), probe_attention_LHTS=att,
                                            inputs={"probe_BT": tokens[None]})
    result = {"runs": runs, "pca": analysis.shared_pca(runs), "out": str(out)}
    if last:
        result["last"] = lasts
    return result


def rewritten(result) -> dict:
    """The same analysis in the shape the statistics rewrite gives it: each trajectory's
    "pivot" (stats.pca_pivot's dict, None without a phase change) in place of its turn angle,
    the phase change's onset_step, and what scores.json keeps of the model and the held-out
    loss. Pivots set by hand: 2l-smear's "no pivot", the others' "pivots"."""
    result = copy.deepcopy(result)
    for name, traj in result["pca"]["trajectories"].items():
        run = result["runs"][name]
        pc = run["phase_change"]
        if pc["detected"]:
            pc["onset_step"] = int(pc["start_step"] * 0.7)
        for k in ("turn_deg", "fastest_step"):
            traj.pop(k, None)
        moves = name != "2l-smear"
        traj["pivot"] = None if not pc["detected"] else {
            "pivot": moves, "turn_deg": 80.0 if moves else None, "before": 0.3,
            "inside": 0.9 if moves else 0.01, "noise": 0.05,
            "note": f"NOTE {name}: " + ("turns 80 deg" if moves else "no motion")}
        metrics = [json.loads(line) for line in open(os.path.join(run["workdir"],
                                                                   "metrics.jsonl"))]
        run["eval_loss"] = {"steps": [r["step"] for r in metrics],
                            "loss": [r["eval_loss"] for r in metrics]}
        layers = np.asarray(run["prefix_matching"]).shape[1]
        run["model"] = {"n_layers": layers, "n_heads": 4, "d_model": 32, "d_head": 8,
                        "mlp": "mlp" in name, "smear_keys": "smear" in name}
    return result


def old_claims(result) -> dict:
    """claims.json as claims.write_results writes it today: no quote, decisive or basis."""
    checks1 = [
        {"member": "2l", "check": "ICL phase change (drop, nats)", "value": 0.4,
         "threshold": 0.27, "status": "pass", "note": ""},
        {"member": "2l", "check": "prefix matching rises in the window", "value": 1500.0,
         "threshold": [821.3, 2779.5], "status": "pass", "note": ""},
        {"member": "2l-smear", "check": "held-out loss falls faster in the window (ratio)",
         "value": 1.06, "threshold": 1.5, "status": "fail", "note": "fall 0.357, 0.336 before"},
        {"member": "1l", "check": "no induction head", "value": 0, "threshold": 0,
         "status": "pass", "note": ""},
    ]
    checks4 = [
        {"member": "2l", "check": "induction head in layer >= 1", "value": "L1H2",
         "threshold": ">= 1 head", "status": "pass", "note": ""},
        {"member": "2l", "check": "copying score of L1H2", "value": 0.99, "threshold": 0.0,
         "status": "pass", "note": ""},
        {"member": "2l", "check": "K-composition above random", "value": 0.22,
         "threshold": 0.145, "status": "pass", "note": ""},
    ]
    checks3 = [{"member": "2l", "check": "largest other head's fraction", "value": None,
                "threshold": 0.25, "status": "unmeasurable", "note": "no window"},
               {"member": "2l-smear", "check": "summed attribution", "value": 0.8,
                "threshold": 0.5, "status": "shown", "note": "shown, not counted"}]
    return {"rows": [{"model": n} for n in result["runs"]],
            "claims": [
                {"claim": "1. Co-occurrence", "verdict": "not supported", "holds": False,
                 "checks": checks1, "evidence": "..."},
                {"claim": "2. Co-perturbation", "verdict": "supported", "holds": True,
                 "checks": copy.deepcopy(checks1[:2]), "evidence": "..."},
                {"claim": "3. Ablation", "verdict": "inconclusive", "holds": False,
                 "checks": checks3, "evidence": "..."},
                {"claim": "4. Mechanism", "verdict": "supported", "holds": True,
                 "checks": checks4, "evidence": "..."}]}


def new_claims(result) -> dict:
    """claims.json in the shape the claims rewrite gives it: a quote per claim, the checks
    that decide it, each check's basis in the paper and why our threshold, and robustness."""
    c = old_claims(result)
    c.update(paper="https://arxiv.org/abs/2209.11895",
             thresholds={"loss_bump": 1.5, "pivot_deg": 45.0},
             ours={"loss_bump": "OURS-WHY loss_bump"})
    for k, claim in enumerate(c["claims"]):
        claim["quote"] = f"QUOTE OF {claim['claim']}"
        claim["argument"] = f"Argument {k + 1 if k < 3 else 5}"
        claim["paper"] = c["paper"]
        claim["decisive"] = [len(claim["checks"]) - 1]
        for i, check in enumerate(claim["checks"]):
            check["basis"] = f"BASIS {claim['claim'][:2]}{i}"
            check["ours"] = None if i else f"OURS {claim['claim'][:2]}"
            check["key"] = i == len(claim["checks"]) - 1
    # claims.robustness over seeds 0-9 (seed 9 did not train), as claims.json keeps it
    titles = [claim["claim"] for claim in c["claims"]]
    c["robustness"] = {
        "claims": {t: {"supported": [0, 1, 2] if t.startswith("1") else list(range(9)),
                       "not supported": list(range(3, 9)) if t.startswith("1") else [],
                       "inconclusive": [], "not run": [9]} for t in titles},
        "seeds": {**{str(s): {t: {"verdict": "not supported" if t.startswith("1") and s >= 3
                                  else "supported",
                                  "why": ["2l-smear: WHY SEED %d" % s]
                                  if t.startswith("1") and s >= 3 else []} for t in titles}
                     for s in range(9)}, "9": {"error": "ERROR OF SEED 9"}}}
    return c


@pytest.fixture(scope="session")
def family_page(tmp_path_factory):
    """(result, path of report.html) of a made-up family of four (1l, 2l and their
    smeared-key twins: every section has something to show), written once per session with
    today's claims.json, a sweep.json beside it and a note from the analysis on 2l's untrained
    ICL score."""
    from icl_jax import report
    out = tmp_path_factory.mktemp("family")
    result = fake_family(str(out), names=("1l", "2l", "1l-smear", "2l-smear"))
    result["runs"]["2l"]["untrained_icl_note"] = "NOTE FROM THE ANALYSIS: why it is low."
    (out / "claims.json").write_text(json.dumps(old_claims(result)))
    (out / "sweep.json").write_text(json.dumps({
        "sweep": "configs/sweeps/quick.py",
        "members": {n: {"workdir": r["workdir"], "wall_s": 60.0}
                    for n, r in result["runs"].items()}}))
    return result, report.write_report(result, preamble="# Results\n\nRESULTS.MD TEXT",
                                       progress=False)
