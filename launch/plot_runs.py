"""Held-out loss, ICL score and best prefix matching over training, from runs' metrics.jsonl.

Usage: python launch/plot_runs.py OUT.png RUN [RUN ...] [--json SERIES.json] [--title TEXT]
A RUN is a training folder (with metrics.jsonl) or a series file this script wrote (--json),
so that a run whose snapshots are gone (a GPU lent for a session) can be drawn again. The
x-axis is tokens seen (--log: log-scaled, as the paper plots training; step 0 left out).
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from icl_jax import workdir as workdir_lib  # noqa: E402


def series(run: str) -> dict:
    """{name: {step, tokens, eval_loss, icl_score, pm_by_layer}} of one run folder or series file."""
    if run.endswith(".json"):
        with open(run) as f:
            return json.load(f)
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    per_step = config["train"]["batch_size"] * config["model"]["context"]
    evals = [r for r in workdir_lib.read_metrics(run) if "prefix_matching" in r]
    if not evals:
        raise SystemExit(f"{run}: no evaluation records in metrics.jsonl")
    return {os.path.basename(os.path.normpath(run)): {
        "step": [r["step"] for r in evals],
        "tokens": [r["step"] * per_step for r in evals],
        "eval_loss": [r["eval_loss"] for r in evals],
        "icl_score": [r["icl_score"] for r in evals],
        "pm_by_layer": [[max(layer) for layer in r["prefix_matching"]] for r in evals]}}


def plot(runs: dict, out: str, title: str = "", log: bool = False):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, s in runs.items():
        keep = [i for i, t in enumerate(s["tokens"]) if t > 0 or not log]
        x = [s["tokens"][i] / 1e9 for i in keep]
        axes[0].plot(x, [s["eval_loss"][i] for i in keep], label=name)
        axes[1].plot(x, [s["icl_score"][i] for i in keep], label=name)
        axes[2].plot(x, [max(s["pm_by_layer"][i]) for i in keep], label=name)
    labels = ("held-out loss (nats)", "ICL score (nats)", "best prefix matching (any layer)")
    for ax, label in zip(axes, labels):
        if log:
            ax.set_xscale("log")
        ax.set_xlabel("tokens seen (billions)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(0, color="grey", lw=0.5)
    axes[2].axhline(0.3, color="grey", lw=0.5, ls="--")
    axes[2].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("runs", nargs="+")
    p.add_argument("--json", help="also write the series drawn, to draw them again later")
    p.add_argument("--title", default="")
    p.add_argument("--log", action="store_true", help="log-scaled tokens")
    args = p.parse_args(argv)
    runs = {}
    for run in args.runs:
        runs.update(series(run))
    plot(runs, args.out, args.title, args.log)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=None, separators=(",", ":"))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()
