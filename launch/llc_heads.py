"""Every head's refined LLC of a run at up to N of its snapshots, with the figure, for when
`icl-jax analyze --llc heads,data` over every snapshot costs too much (the text-cpu 2L:
docs/llc-heads.md).

  python launch/llc_heads.py --workdir runs/text-cpu/2l --snapshots 12 --chains 2 --data \
      [--out runs/text-cpu/2l/analysis-heads] [--config.llc.draws=100]

It runs analysis.analyze with llc_heads=head_llc.HeadView(subsets=--data, snapshots=N,
chains=C) and no whole-model LLC, into --out (default <workdir>/analysis-heads, so that the
run's own analysis is left as it is): scores.json (the paper's scores of every snapshot and
llc_heads) and head_llc.png (head_llc_plot.plot_head_llc). Overrides of the eval and llc
sections (--config.llc.*) apply as `analyze` takes them. Run again, it reuses scores.json.
"""
import argparse
import os
import sys
import time


def main(argv=None):
    from icl_jax import cli
    rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else list(argv))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--snapshots", type=int, default=12,
                   help="at most this many snapshots, spread over log steps (0: every one)")
    p.add_argument("--chains", type=int, default=0, help="chains a head (0: the llc section's)")
    p.add_argument("--data", action="store_true",
                   help="also the data-refined LLC on the data's subsets")
    p.add_argument("--out", help="output folder (default <workdir>/analysis-heads)")
    args = p.parse_args(rest)
    if args.snapshots < 0 or args.chains < 0:
        p.error("--snapshots and --chains must be >= 0")

    from icl_jax import analysis, head_llc, head_llc_plot
    view = head_llc.HeadView(subsets=args.data, snapshots=args.snapshots, chains=args.chains)
    out = args.out or os.path.join(args.workdir, "analysis-heads")
    t0 = time.time()
    result = analysis.analyze([args.workdir], out=out, llc_heads=view, measure=overrides)
    (name, scores), = result["runs"].items()
    fig = head_llc_plot.plot_head_llc(scores, title=name)
    fig.savefig(os.path.join(out, "head_llc.png"), dpi=120)
    rec = scores["llc_heads"]
    print(f"{name}: {len(rec['steps'])} snapshots x {len(rec['wrllc'][0]) * len(rec['wrllc'][0][0])} "
          f"heads, {rec['chains']} chains x {rec['draws']} draws, {time.time() - t0:.0f} s; "
          f"{out}/scores.json, {out}/head_llc.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
