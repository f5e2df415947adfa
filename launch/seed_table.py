"""The quick profile across seeds: one `icl-jax reproduce --seed S` per seed, then a table.

    for s in 0 1 2 3 4 5 6 7 8 9; do
      icl-jax reproduce --seed $s --workdir runs/seeds/s$s --quiet
    done
    python launch/seed_table.py runs/seeds/s* > docs/seeds.md

The table is rebuilt from each workdir's saved scores (claims.load_saved: scores.json of
every member, one PCA refitted over them): the phase-change rule and the claims are
applied again with the code as it stands, so a change to either shows on every seed without retraining. A seed whose
reproduction did not finish is listed with what is missing; none is left out.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from icl_jax import claims  # noqa: E402

MEMBERS = claims.FAMILY


def load(workdir):
    """(result as analysis.analyze returns it, seed, training minutes) or raises OSError."""
    result = claims.load_saved([workdir])
    missing = [n for n in MEMBERS if n not in result["runs"]]
    if missing:
        raise FileNotFoundError(f"no scores.json for {', '.join(missing)}")
    with open(os.path.join(workdir, "sweep.json")) as f:
        members = json.load(f)["members"]
    with open(os.path.join(workdir, "2l", "config.json")) as f:
        seed = json.load(f)["seed"]
    minutes = sum(m.get("wall_s") or 0.0 for m in members.values()) / 60
    return result, seed, minutes


def _window(run):
    pc = run["phase_change"]
    return f"{pc['start_step']:,}-{pc['end_step']:,}" if pc["detected"] else "none"


def _best(run):
    l, h, pm, cp = claims._best_head(run)
    return f"L{l}H{h} {pm:.2f}"


def _failed(claim):
    bad = [c for c in claim["checks"] if c["status"] in ("fail", "unmeasurable")]
    return "; ".join(f"{c['member']}: {c['check']}" for c in bad[:2]) + (
        f" (+{len(bad) - 2})" if len(bad) > 2 else "")


def table(workdirs) -> str:
    head = ["seed", "train min", "2L window", "3L window", "2L-MLP window", "best head 2L",
            "best head 3L", "best head 2L-MLP", "claims 1 2 3 4", "what failed"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    counts, finished = [0, 0, 0, 0], 0
    for w in workdirs:
        try:
            result, seed, minutes = load(w)
        except (OSError, KeyError, ValueError) as e:
            lines.append(f"| {os.path.basename(w)} | - | not finished: {e} |" + " |" * 7)
            continue
        runs, finished = result["runs"], finished + 1
        _, found = claims.check_claims(result)
        marks = []
        for i, c in enumerate(found):
            counts[i] += c["verdict"] == "supported"
            marks.append({"supported": "yes", "not supported": "no"}.get(c["verdict"], "?"))
        why = " / ".join(f"{c['claim'][0]}: {_failed(c)}" for c in found
                         if c["verdict"] != "supported")
        lines.append(f"| {seed} | {minutes:.1f} | {_window(runs['2l'])} | {_window(runs['3l'])} "
                     f"| {_window(runs['2l-mlp'])} | {_best(runs['2l'])} | {_best(runs['3l'])} "
                     f"| {_best(runs['2l-mlp'])} | {' '.join(marks)} | {why or '-'} |")
    lines += ["", "Supported on " + ", ".join(f"claim {i + 1}: {n}" for i, n in enumerate(counts))
              + f" of {finished} finished seeds ({len(workdirs) - finished} not finished)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+", help="reproduce workdirs, one per seed")
    args = p.parse_args(argv)
    sys.stdout.write(table(sorted(args.workdirs)))


if __name__ == "__main__":
    main()
