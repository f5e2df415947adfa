"""The local learning coefficient of chosen snapshots of a run, for when every snapshot
(`icl-jax analyze --llc`) costs too much: on one CPU core a text-cpu 2L snapshot takes
about a minute at 2 chains x 100 draws.

  python launch/llc_steps.py --workdir runs/2l --steps 0,500,1000,2000,3000,5000 \
      --out llc.json [--scores runs/2l/analysis/scores.json --plot llc.png] [--config.llc.chains=2]

Overrides of the llc section (--config.llc.*) apply as `analyze` takes them (any field
outside eval and llc is refused). With --scores
(an analysis' scores.json of the same run) the figure puts the ICL score and its phase
change beside the LLC, as the report does.
"""
import argparse
import json
import sys


def main(argv=None):
    from icl_jax import cli
    rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else list(argv))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", required=True, help="comma-separated snapshot steps")
    p.add_argument("--out", required=True, help="a JSON file for the estimates")
    p.add_argument("--scores", help="the run's scores.json, for the ICL score in the figure")
    p.add_argument("--plot", help="a PNG of the LLC beside the ICL score (needs --scores)")
    args = p.parse_args(rest)
    if args.plot and not args.scores:
        p.error("--plot needs --scores (the ICL score it is drawn beside)")

    from icl_jax import analysis, data as data_lib, llc as llc_lib
    run = analysis.open_run(args.workdir, overrides)  # eval.* and llc.* only
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    missing = sorted(set(steps) - set(run.steps))
    if missing:
        p.error(f"no snapshot at step(s) {missing} in {args.workdir}; it has {run.steps}")
    source = data_lib.make_source(run.config, run.workdir)
    pool = llc_lib.held_out_pool(source, run.config)
    res = llc_lib.llc_over_snapshots(run.model, [run.params(s) for s in steps], pool,
                                     run.config.llc, steps=steps, seed=run.config.seed,
                                     progress=True)
    for m in res["messages"]:
        print(f"warning: {m}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump({"workdir": args.workdir, "steps": steps, "llc": res["llc"].tolist(),
                   "llc_std": res["llc_std"].tolist(), "init_loss": res["init_loss"].tolist(),
                   "diverged": res["diverged"], "llc_section": run.config.llc.to_dict()}, f,
                  indent=1)
    print(" ".join(f"{s}:{v:.1f}" for s, v in zip(steps, res["llc"])))
    if args.plot:
        from icl_jax import report
        with open(args.scores) as f:
            scores = json.load(f)
        icl = dict(zip(scores["steps"], scores["icl_score"]))
        fig = report.plot_llc(steps, res["llc"], res["llc_std"],
                              [icl.get(s, float("nan")) for s in steps],
                              scores.get("phase_change"), title=scores.get("name", ""))
        fig.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
