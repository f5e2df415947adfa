"""icl-jax: the command line. Thin: it parses, then calls the library."""
from __future__ import annotations

import argparse
import sys

DEFAULT_CONFIG = "small"


def split_overrides(argv):
    """Pulls '--config.a.b=v' and '--config.a.b v' out of argv."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: {arg} needs a value")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _ablation(kind: str) -> str:
    from icl_jax.scores import ABLATIONS  # imports jax: only when --ablation is given
    if kind not in ABLATIONS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(ABLATIONS)}, got {kind!r}")
    return kind


def _llc_mode(text: str):
    from icl_jax.head_llc import parse_mode
    try:
        return parse_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--llc ")) from None


def build_parser():
    from icl_jax import __version__
    parser = argparse.ArgumentParser(
        prog="icl-jax",
        description="In-context learning and induction heads (Olsson et al. 2022) in JAX.")
    parser.add_argument("--version", action="version", version=f"icl-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model; resumes from the newest snapshot",
                       epilog="Any config field can be overridden: --config.train.steps=4000. "
                              "Without --config, a --workdir that holds a run continues it "
                              "with its own config: --config.train.steps=N (more than it "
                              "had) trains it longer, unless its schedule is cosine.")
    p.add_argument("--config", default=None,
                   help=f"a built-in config or a config file (Python that icl-jax executes) "
                        f"and its argument, e.g. small:layers=2 or my_config.py:layers=2 "
                        f"(default: the run in --workdir, or {DEFAULT_CONFIG}; `icl-jax "
                        f"configs` lists the built-in ones)")
    p.add_argument("--workdir", required=True, help="where snapshots and metrics go")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of a different config in --workdir")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("unlock", help="break the lock a killed trainer left on a workdir "
                                      "(object storage; a local lock frees itself)")
    p.add_argument("--workdir", required=True)

    p = sub.add_parser("analyze", help="score every snapshot; phase change, PCA, figures, report",
                       epilog="Overrides of the eval and llc fields (--config.eval.n_examples="
                              "1024) measure the runs with other values than they were trained "
                              "with; no other field can change.")
    p.add_argument("--workdir", required=True, nargs="+", help="one or more training runs")
    p.add_argument("--out", default=None,
                   help="output folder (default: <workdir>/analysis, or <common parent>/analysis)")
    p.add_argument("--chunk", type=int, default=16, help="snapshots scored at once")
    p.add_argument("--ablation", default="pattern", type=_ablation,
                   help="how heads are ablated for their ICL attribution: pattern (patterns "
                        "frozen; default), zero or mean")
    p.add_argument("--llc", nargs="?", const="model", default=None, type=_llc_mode,
                   metavar="model|heads|heads,data",
                   help="also estimate the local learning coefficient of every snapshot "
                        "(SGLD chains; the config's llc section; minutes on a CPU); heads: "
                        "and every head's (weight-refined); heads,data: and every head's on "
                        "the data's subsets (data-refined; docs/llc-heads.md)")
    p.add_argument("--rescore", action="store_true",
                   help="score every snapshot again, even where a scores.json written with "
                        "the same snapshots, config and scoring code could be reused")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("claims", help="the paper's claims from analyses saved on disk (members "
                       "analysed apart, on other machines), with the code as it stands")
    p.add_argument("--scores", nargs="+", required=True,
                   help="folders holding <member>/scores.json (what analyze --out writes)")
    p.add_argument("--out", default=None,
                   help="where results.md and claims.json go (default: the first folder)")

    p = sub.add_parser("reproduce", help="train the paper's family, analyse it, check the claims",
                       epilog="Config overrides (--config.train.steps=...) apply to every member.")
    p.add_argument("--workdir", default="runs/reproduce", help="one subfolder per member")
    p.add_argument("--profile", default="quick", choices=("quick", "text", "text-cpu", "paper"),
                   help="quick: synthetic data, minutes on a CPU; text: Hoogland et al.'s shape on "
                        "installed Python source (2B tokens a member, for accelerators); text-cpu: "
                        "the same source at the CPU search's setting (hours on 2 cores); paper: "
                        "the paper's shapes, for accelerators")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None, metavar="0-9",
                   help="train and check several seeds (0-9, 0,3,5), each in <workdir>/s<seed>, "
                        "and write the claims' robustness over them into <workdir>/results.md "
                        "and report.html (on an accelerator each member's seeds train as one "
                        "ensemble)")
    p.add_argument("--llc", action="store_true",
                   help="also the local learning coefficient of every 1l and 2l snapshot, "
                        "and every head's of 12 snapshots of 2l and 3l")
    p.add_argument("--jobs", type=int, default=None,
                   help="members trained at once (default: one per core on a CPU, each in "
                        "its own process, longest first; one on an accelerator)")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("sweep", help="train every member of a sweep, N at a time; sweep.json "
                       "indexes them", epilog="Config overrides (--config.train.steps=...) apply "
                       "to every member, after the sweep's own.")
    p.add_argument("--config", required=True,
                   help="a built-in sweep or a sweep file (Python that icl-jax executes) and "
                        "its argument, e.g. paper_small:attn or my_sweep.py")
    p.add_argument("--workdir", required=True, help="one subfolder per member, and sweep.json")
    p.add_argument("--jobs", type=int, default=1, help="members trained at once (default 1)")
    p.add_argument("--members", default=None, help="comma-separated subset, e.g. 1l,2l")
    p.add_argument("--analyze", action="store_true",
                   help="then analyse the finished members together (one shared PCA)")
    p.add_argument("--ensemble", action="store_true",
                   help="train members that differ only in seed, lr, weight decay or data as "
                        "one vmapped ensemble")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("bench", help="time training (against PyTorch and TransformerLens), "
                       "scoring, ensembles, snapshots and data; prints a table",
                       epilog="Config overrides (--config.train.batch_size=...) apply to every "
                       "config benchmarked.")
    p.add_argument("--suite", default="default",
                   choices=("default", "train", "score", "ensemble", "checkpoint", "data",
                            "accelerator", "llc", "prefetch"))
    p.add_argument("--out", default="bench_accelerator",
                   help="accelerator suite: folder for accelerator.json and accelerator.md")
    p.add_argument("--tiny", action="store_true", help="accelerator suite: every case shrunk")
    p.add_argument("--reproduce", action="store_true",
                   help="accelerator suite: also time `icl-jax reproduce --profile quick`")
    p.add_argument("--config", action="append", default=None,
                   help="config to benchmark (repeatable), e.g. small:layers=2; "
                        "default: the quick profile, a d_model 256 model and the paper's shape")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after warm-up")
    p.add_argument("--json", default=None, help="also write the rows and metadata here")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch threads (default: every core)")

    p = sub.add_parser("export", help="one snapshot as .npz in TransformerLens naming")
    p.add_argument("--workdir", required=True, help="a training run")
    p.add_argument("--step", type=int, default=None, help="snapshot step (default: newest)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--transformer-lens", default=None, metavar="FILE.pt",
                   help="also write a HookedTransformer config and state dict (needs torch "
                        "and transformer_lens: pip install 'icl_jax[tl]')")

    sub.add_parser("configs", help="list the built-in configs and sweeps, with the files to "
                                   "copy for your own")
    return parser


def load_config(spec, overrides):
    from icl_jax import config as config_lib
    return config_lib.load_validated(spec, overrides)


def cmd_train(args, overrides):
    from icl_jax import train, workdir
    workdir.check_usable(args.workdir)
    if args.config is None and (workdir.has_run(args.workdir)
                                or workdir.snapshot_steps(args.workdir)):
        # the run in --workdir, continued (with --config.train.steps=N: trained longer)
        from icl_jax import config as config_lib
        config = config_lib.with_overrides(train.run_config(args.workdir), overrides)
    else:
        config = load_config(args.config or DEFAULT_CONFIG, overrides)
    from icl_jax import sweep
    sweep.use_compilation_cache(sweep.compilation_cache())  # a resume loads, not compiles
    record = train.train_and_evaluate(config, args.workdir, overwrite=args.overwrite,
                                      progress=not args.quiet)
    import jax
    if record and not args.quiet and jax.process_index() == 0:
        keys = ("step", "train_loss", "eval_loss", "icl_score", "prefix_matching_max")
        print("final: " + "  ".join(f"{k} {record[k]:.4g}" if isinstance(record.get(k), float)
                                    else f"{k} {record.get(k)}" for k in keys if k in record))
    return 0


def cmd_claims(args, overrides):
    from icl_jax import claims
    result = claims.load_saved(args.scores)
    rows, found = claims.check_claims(result)
    text = claims.results_markdown(rows, found, "saved analyses", provenance=(
        f"Claims checked again from the saved analyses in {', '.join(args.scores)} "
        f"(members: {', '.join(result['runs'])})."))
    out = args.out or args.scores[0]
    claims.write_results(out, rows, found, text)
    for c in found:
        print(f"{c['claim']}: {c['verdict']}")
    print(f"results: {out}/results.md")
    return 0


def cmd_analyze(args, overrides):
    from icl_jax import analysis
    if args.chunk < 1:
        print(f"error: --chunk must be a positive number of snapshots, got {args.chunk}",
              file=sys.stderr)
        return 2
    result = analysis.analyze(args.workdir, out=args.out, chunk=args.chunk,
                              ablation=args.ablation, progress=not args.quiet,
                              llc=bool(args.llc), llc_heads=args.llc and args.llc[1],
                              rescore=args.rescore, measure=overrides)
    from icl_jax import report
    report.write_report(result, progress=not args.quiet)
    for row in analysis.headline(result):
        print(f"{row['run']}: ICL {row['ICL score (last)']:+.3f}; phase change: "
              f"{row['phase change']}; induction heads: {row['induction heads']}")
    print(f"report: {result['out']}/report.html")
    return 0


def cmd_export(args, overrides):
    from icl_jax import export
    print(export.export(args.workdir, args.step, args.out))
    if args.transformer_lens:
        try:
            print(export.export_hooked_transformer(args.workdir, args.step, args.transformer_lens))
        except (ValueError, ImportError) as e:
            print(f"error: no TransformerLens export: {e}", file=sys.stderr)
            return 2
    return 0


def cmd_reproduce(args, overrides):
    from icl_jax import reproduce
    if args.jobs is not None and args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    if args.seeds is not None:
        seeds = reproduce.parse_seeds(args.seeds)
        reproduce.reproduce_seeds(args.profile, args.workdir, seeds, overrides,
                                  progress=not args.quiet, llc=args.llc, jobs=args.jobs)
        print(f"results: {args.workdir}/results.md  report: {args.workdir}/report.html")
        return 0
    reproduce.reproduce(args.profile, args.workdir, args.seed, overrides,
                        progress=not args.quiet, llc=args.llc, jobs=args.jobs)
    print(f"results: {args.workdir}/results.md  report: {args.workdir}/report.html")
    return 0


def cmd_bench(args, overrides):
    from icl_jax import bench
    if args.repeats < 1:
        print(f"error: --repeats must be at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    bench.run(args.suite, args.config, repeats=args.repeats, json_path=args.json,
              torch_rows=not args.no_torch, torch_threads=args.torch_threads,
              overrides=overrides, out_dir=args.out, tiny=args.tiny,
              with_reproduce=args.reproduce)
    return 0


def cmd_sweep(args, overrides):
    from icl_jax import sweep
    members = [m.strip() for m in args.members.split(",") if m.strip()] if args.members else None
    index = sweep.run_sweep(args.config, args.workdir, jobs=args.jobs, analyze=args.analyze,
                            members=members, ensemble=args.ensemble, dry_run=args.dry_run,
                            overrides=overrides, progress=not args.quiet)
    failed = [n for n, m in index["members"].items() if m.get("status") == "failed"
              and (members is None or n in members)]
    return 1 if failed else 0


def cmd_unlock(args, overrides):
    from icl_jax import workdir
    owner = workdir.break_lock(args.workdir)
    print(f"removed the lock of {workdir.describe_owner(owner)}" if owner is not None
          else f"{args.workdir} was not locked")
    return 0


def cmd_configs(args, overrides):
    from icl_jax import config as config_lib
    for kind, usage in (("config", "--config NAME[:ARG]"), ("sweep", "sweep --config NAME[:ARG]")):
        print(f"built-in {kind}s ({usage}):")
        for name, path in config_lib.builtin(kind).items():
            print(f"  {name:14s} {config_lib.summary(path)}")
    print(f"files: {config_lib.BUILTIN} (copy one and pass its path; each is Python that "
          "icl-jax executes)")
    return 0


COMMANDS = {"configs": cmd_configs, "unlock": cmd_unlock, "train": cmd_train, "analyze": cmd_analyze,
            "claims": cmd_claims, "export": cmd_export,
            "reproduce": cmd_reproduce, "sweep": cmd_sweep, "bench": cmd_bench}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    from icl_jax import distributed
    from icl_jax.config import ConfigError
    from icl_jax.data import DataError
    from icl_jax.workdir import WorkdirError
    # a user's mistake, or a file or disk it broke, is one line; anything else (a KeyError
    # from a bug) keeps its traceback
    user_errors = (ConfigError, DataError, WorkdirError, distributed.DistributedError, OSError)
    try:
        if args.command != "sweep":  # a sweep's members join the multi-host run, not the sweep
            distributed.maybe_initialize()
        return COMMANDS[args.command](args, overrides)
    except user_errors + _heavy_user_errors() as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _heavy_user_errors() -> tuple:
    """The user-error classes of modules that import jax, once something has imported them
    (an error from a module not yet imported cannot have been raised)."""
    found = []
    for module, name in (("icl_jax.train", "TrainingError"),
                         ("icl_jax.checkpoints", "SnapshotError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def _one_line(e: BaseException) -> str:
    """An error's message on one line; an OSError as what failed on which file (its args
    are (errno, text), not a message)."""
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = " -> ".join(f for f in (e.filename, e.filename2) if f)
        return f"{e.strerror}: {where}" if where else e.strerror
    message = e.args[0] if e.args else str(e)
    return " ".join(str(message).split())
