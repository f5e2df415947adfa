"""The CPU search for natural text: the cheapest setting in which a vanilla 2-layer
attention-only model forms an induction head on Python source (pycode) and shows the phase change.

Runs TRIALS one after another, each `icl-jax train` into RUNS/<trial>, capped in CPU seconds
(the machine is shared: wall time says little about cost); a trial cut short resumes from its
newest snapshot on the next call, and one that is done is skipped. Every trial, failed ones
too, is appended to RUNS/trials.jsonl and docs/text-search.md is rebuilt from that log.

    setsid nohup taskset -c 1 nice -n 19 env \
      XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
      PYTHONPATH=$PWD python launch/text_search.py > /work/runs-text/search.log 2>&1 &

    python launch/text_search.py --doc-only     # rebuild docs/text-search.md from the log
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG = "text_pycode"
PM_THRESHOLD = 0.3  # an induction head: prefix matching above this, copying above 0
# the corpus every trial shares: the standard library and the installed packages, named
# explicitly so that the corpus does not depend on PYTHONPATH or the working directory
ROOTS = ",".join(dict.fromkeys(sysconfig.get_paths()[k] for k in ("stdlib", "purelib")))
CAP = 25 * 60  # CPU seconds a trial may use, unless the trial says otherwise

# Most promising first. The leads: a small model at short context with a larger lr (CPU
# sized); LayerNorm allows the larger lr; smaller vocabularies make steps cheaper but make a
# single token a weaker key; Hoogland et al.'s shape (d 256, 8 heads, 5k BPE, ctx 1024,
# lr 1e-3) needs ~1B tokens, far beyond this machine.
TRIALS = [
    dict(name="d64-c128-v2048-lr3e-3-ln", arg="d_model=64,heads=4,context=128,vocab=2048,"
         "lr=3e-3,warmup=200,batch=32,ln=true"),
    dict(name="d128-c256-v2048-lr2e-3-ln", arg="d_model=128,heads=4,context=256,vocab=2048,"
         "lr=2e-3,warmup=200,batch=32,ln=true"),
    dict(name="d64-c128-v2048-lr3e-3-noln", arg="d_model=64,heads=4,context=128,vocab=2048,"
         "lr=3e-3,warmup=200,batch=32,ln=false"),
    dict(name="d64-c256-v1024-lr3e-3-ln", arg="d_model=64,heads=4,context=256,vocab=1024,"
         "lr=3e-3,warmup=200,batch=32,ln=true"),
    # stopped at step 2,751 by a stray SIGTERM (logged as finished) with prefix matching
    # rising (0.04 -> 0.22 over steps 2,000-2,750): resumed with 45 CPU minutes, the budget
    # of the last trial, which no longer runs
    dict(name="d128-c128-v2048-lr5e-3-ln-b64", arg="d_model=128,heads=4,context=128,vocab=2048,"
         "lr=5e-3,warmup=300,batch=64,ln=true", cap_cpu_s=2700),
    dict(name="d128-c256-v4096-lr1e-3-ln", arg="d_model=128,heads=4,context=256,vocab=4096,"
         "lr=1e-3,warmup=500,batch=32,ln=true"),
]
# not run: its 25 minutes went to the b64 trial above
# dict(name="d64-c128-v1024-lr1e-2-ln", arg="d_model=64,heads=4,context=128,vocab=1024,"
#      "lr=1e-2,warmup=300,batch=32,ln=true"),


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def trial_config(trial):
    from icl_jax import config as config_lib
    return config_lib.load_validated(f"{CONFIG}:{trial['arg']}", {"data.roots": ROOTS})


def _cpu_seconds(pid):
    """User + system CPU time of a live process (its threads included), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _state(workdir):
    try:
        with open(os.path.join(workdir, "search_state.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return dict(cpu_s=0.0, wall_s=0.0, sessions=0)


def _save_state(workdir, state):
    tmp = os.path.join(workdir, "search_state.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, os.path.join(workdir, "search_state.json"))


def _evals(workdir):
    from icl_jax import workdir as workdir_lib
    return [r for r in workdir_lib.read_metrics(workdir) if "prefix_matching" in r]


def _succeeded_long_enough(evals):
    """Prefix matching above threshold, held for max(1000 steps, half the steps it took)."""
    cross = next((r["step"] for r in evals if r["prefix_matching_last_layer_max"] > PM_THRESHOLD),
                 None)
    return cross is not None and evals[-1]["step"] >= cross + max(1000, cross // 2)


def train(trial, runs, stop):
    """Trains (or resumes) one trial until done, capped or stopped; returns how it ended."""
    workdir = os.path.join(runs, trial["name"])
    os.makedirs(workdir, exist_ok=True)
    state = _state(workdir)
    cap = trial.get("cap_cpu_s", CAP)
    if state["cpu_s"] >= cap:
        return "capped"
    cmd = [sys.executable, "-m", "icl_jax", "train", "--config", f"{CONFIG}:{trial['arg']}",
           "--workdir", workdir, f"--config.data.roots={ROOTS}"]
    log(f"{trial['name']}: training ({state['cpu_s']:.0f} of {cap} CPU s used)")
    with open(os.path.join(workdir, "train.log"), "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    base_cpu, base_wall, start, ended = state["cpu_s"], state["wall_s"], time.time(), None
    state["sessions"] += 1
    last_cpu = 0.0
    while proc.poll() is None:
        time.sleep(15)
        cpu = _cpu_seconds(proc.pid)
        last_cpu = cpu if cpu is not None else last_cpu
        state.update(cpu_s=base_cpu + last_cpu, wall_s=base_wall + time.time() - start)
        _save_state(workdir, state)
        if ended is None:
            if stop["now"]:
                ended = "stopped"
            elif state["cpu_s"] >= cap:
                ended = "capped"
            elif _succeeded_long_enough(_evals(workdir)):
                ended = "succeeded"
            if ended:  # the trainer saves a snapshot on SIGTERM, then exits
                log(f"{trial['name']}: {ended} at {state['cpu_s']:.0f} CPU s; stopping it")
                proc.send_signal(signal.SIGTERM)
                deadline = time.time() + 300
        elif time.time() > deadline:
            proc.kill()
    state.update(wall_s=base_wall + time.time() - start)
    _save_state(workdir, state)
    if ended is None and proc.returncode == 0 and _last_step(workdir) < trial_config(
            trial).train.steps:
        # a SIGTERM from outside the search: the trainer saved and exited cleanly, short of
        # its steps (it happened: a stray pkill); the trial resumes on the next call
        log(f"{trial['name']}: stopped from outside at step {_last_step(workdir)}")
        ended = "stopped"
    if ended is None:
        ended = "finished" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return ended


def _last_step(workdir):
    from icl_jax import workdir as workdir_lib
    records = workdir_lib.read_metrics(workdir)
    return records[-1]["step"] if records else 0


def summarize(trial, runs, ended, build_s):
    """The record of a trial: config, cost, prefix matching over training, copying, ICL, outcome."""
    from icl_jax import checkpoints, workdir as workdir_lib
    workdir = os.path.join(runs, trial["name"])
    config, state = trial_config(trial), _state(workdir)
    m, t = config.model, config.train
    rec = dict(trial=trial["name"], arg=trial["arg"], roots=ROOTS, vocab=m.vocab_size,
               context=m.context, d_model=m.d_model, n_heads=m.n_heads, layer_norm=m.layer_norm,
               lr=t.lr, warmup=t.warmup_steps, batch=t.batch_size, cpu_s=round(state["cpu_s"]),
               wall_s=round(state["wall_s"]), corpus_build_s=round(build_s), ended=ended,
               cap_cpu_s=trial.get("cap_cpu_s", CAP),
               date=datetime.datetime.now().isoformat(timespec="seconds"))
    evals = _evals(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
    if not evals:
        tail = ""
        if os.path.exists(os.path.join(workdir, "train.log")):
            with open(os.path.join(workdir, "train.log")) as fh:
                tail = fh.read()[-400:]
        return dict(rec, outcome=f"no evaluation ({ended})", log_tail=tail)
    last = workdir_lib.read_metrics(workdir)[-1]  # where training stopped, maybe past an eval
    steps = [r["step"] for r in evals]
    pm = [r["prefix_matching_last_layer_max"] for r in evals]
    best = max(range(len(pm)), key=pm.__getitem__)
    last_layer = evals[-1]["prefix_matching"][-1]
    head = max(range(len(last_layer)), key=last_layer.__getitem__)
    cross = next((s for s, v in zip(steps, pm) if v > PM_THRESHOLD), None)
    rec.update(steps=last["step"], tokens=last["tokens"], s_per_step=round(
        state["cpu_s"] / max(last["step"], 1), 3), best_pm=round(pm[best], 3), best_pm_step=steps[best],
        pm_last=round(pm[-1], 3), pm_cross_step=cross, head=[m.n_layers - 1, head],
        pm_curve=[[s, round(v, 3)] for s, v in zip(steps, pm)],
        icl_first=round(evals[0]["icl_score"], 3), icl_last=round(evals[-1]["icl_score"], 3),
        eval_loss_last=round(evals[-1].get("eval_loss", float("nan")), 3))
    try:  # copying of the best last-layer head at the newest snapshot, from the weights
        from icl_jax import scores
        run = checkpoints.Run(workdir)
        rec["copying"] = round(float(scores.copying(run.model, run.params())[-1, head]), 3)
        rec["copying_step"] = run.steps[-1]
    except Exception as e:  # noqa: BLE001 - the record must be written whatever fails here
        rec["copying_error"] = repr(e)[:200]
    try:
        from icl_jax import analysis
        icl = [r["icl_score"] for r in evals]
        pc = analysis.detect_phase_change(steps, icl, [r["tokens"] for r in evals])
        rec["phase_change"] = {k: pc.get(k) for k in ("detected", "reason", "start_step",
                                                      "end_step", "drop")}
    except Exception as e:  # noqa: BLE001
        rec["phase_change"] = dict(detected=False, reason=f"error: {e!r}"[:200])
    induction = pm[-1] > PM_THRESHOLD and rec.get("copying", -1) > 0
    if induction and rec["phase_change"].get("detected"):
        rec["outcome"] = "induction head and phase change"
    elif induction:
        rec["outcome"] = "induction head, no phase change detected"
    elif pm[best] > PM_THRESHOLD:
        rec["outcome"] = "prefix matching above 0.3, copying not positive"
    else:
        rec["outcome"] = f"no induction head ({ended})"
    return rec


def _fmt(v, spec="{:.2f}"):
    return "-" if v is None else spec.format(v)


def _in_progress(runs, records):
    """Lines for trials started but not yet recorded: how far each has got."""
    lines, done = [], {r["trial"] for r in records}
    for t in TRIALS:
        workdir = os.path.join(runs, t["name"])
        if t["name"] in done or not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            continue
        evals = _evals(workdir)
        if evals:
            best = max(evals, key=lambda r: r["prefix_matching_last_layer_max"])
            lines.append(f"- {t['name']}: step {evals[-1]['step']}, "
                         f"{_state(workdir)['cpu_s'] / 60:.0f} CPU min, best PM "
                         f"{best['prefix_matching_last_layer_max']:.3f} (step {best['step']}), "
                         f"ICL {evals[-1]['icl_score']:.2f}")
    return ["", "In progress (not yet recorded):", "", *lines] if lines else []


def write_doc(records, path, budget_s, runs=None):
    # a trial resumed under a larger cap has several records: its newest stands for it
    records = list({r["trial"]: r for r in records}.values())
    spent = sum(r.get("cpu_s", 0) for r in records)
    lines = [
        "# Natural text on this CPU: the search",
        "",
        "Generated by `launch/text_search.py` from its log (`/work/runs-text/trials.jsonl`); "
        "do not edit by hand.",
        "",
        "Goal: the cheapest setting in which a vanilla 2-layer attention-only model (shortformer "
        "positions, no smeared keys) forms an induction head on natural text (best last-layer "
        f"prefix matching > {PM_THRESHOLD} with a positive copying score) and shows the phase "
        "change (`analysis.detect_phase_change` on the ICL score at evaluation steps). Corpus: "
        "`data.name=pycode` over the standard library and the installed packages, deduplicated, "
        "BPE. Each trial runs on one core at the lowest priority on a 2-core machine shared with "
        "other work, so cost is counted in CPU seconds, not wall time. "
        f"Budget: {budget_s / 3600:.1f} CPU hours; spent {spent / 3600:.2f}.",
        "",
        "| trial | vocab | ctx | d | heads | LN | lr | warm-up | batch | steps | tokens | CPU min "
        "| s/step | best PM (step) | PM > 0.3 from | copying | ICL first -> last | phase change "
        "| outcome |",
        "|" + "---|" * 19,
    ]
    for r in records:
        if "vocab" not in r:  # failed before training: only the name and why
            lines.append(f"| {r['trial']} |" + " - |" * 17 + f" {r['outcome']} |")
            continue
        pc = r.get("phase_change") or {}
        pcs = (f"{pc.get('start_step')}-{pc.get('end_step')}" if pc.get("detected")
               else (pc.get("reason") or "-")[:40])
        lines.append(
            f"| {r['trial']} | {r['vocab']} | {r['context']} | {r['d_model']} | {r['n_heads']} "
            f"| {'on' if r['layer_norm'] else 'off'} | {r['lr']:g} | {r['warmup']} | {r['batch']} "
            f"| {r.get('steps', '-')} | {_fmt(r.get('tokens') and r['tokens'] / 1e6, '{:.1f}M')} "
            f"| {r['cpu_s'] / 60:.0f} | {_fmt(r.get('s_per_step'), '{:.3f}')} "
            f"| {_fmt(r.get('best_pm'), '{:.3f}')} ({r.get('best_pm_step', '-')}) "
            f"| {r.get('pm_cross_step') or '-'} | {_fmt(r.get('copying'), '{:+.2f}')} "
            f"| {_fmt(r.get('icl_first'))} -> {_fmt(r.get('icl_last'))} | {pcs} | {r['outcome']} |")
    lines += _in_progress(runs, records) if runs else []
    lines += [
        "",
        "PM: the largest prefix-matching score of a last-layer head on the repeated-token probe "
        "(25 tokens x 4), at evaluation steps; copying: Re(sum eig)/sum|eig| of that head's OV "
        "circuit at the newest snapshot; ICL: loss at index 10k minus loss at index k "
        "(k = context / 12). A trial stops at its CPU cap, or once prefix matching has stayed "
        "above 0.3 for max(1,000 steps, half the steps it took).",
        "",
        "Resume the search (finished trials are skipped, unfinished ones resume from their "
        "newest snapshot):",
        "",
        "```bash",
        "setsid nohup taskset -c 1 nice -n 19 env XLA_FLAGS=\"--xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1\" PYTHONPATH=$PWD /work/main/.venv/bin/python "
        "launch/text_search.py "
        "> /work/runs-text/search.log 2>&1 &",
        "```",
        "",
    ]
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines))
    os.replace(tmp, path)


def main(argv=None):
    global ROOTS, CAP
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="/work/runs-text", help="one workdir per trial, and the log")
    p.add_argument("--doc", default=os.path.join(REPO, "docs", "text-search.md"))
    p.add_argument("--budget-hours", type=float, default=3.0, help="CPU hours for all trials")
    p.add_argument("--only", default=None, help="comma-separated trial names")
    p.add_argument("--roots", default=ROOTS, help="the corpus folders (data.roots)")
    p.add_argument("--cap-minutes", type=float, default=CAP / 60,
                   help="CPU minutes a trial may use unless it says otherwise")
    p.add_argument("--doc-only", action="store_true", help="rebuild the doc from the log")
    args = p.parse_args(argv)
    ROOTS, CAP = args.roots, args.cap_minutes * 60
    log_path = os.path.join(args.runs, "trials.jsonl")
    if args.doc_only:
        write_doc(read_jsonl(log_path), args.doc, args.budget_hours * 3600, args.runs)
        return
    os.makedirs(args.runs, exist_ok=True)
    stop = dict(now=False)

    def on_signal(signum, frame):
        stop["now"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    trials = [t for t in TRIALS if args.only is None or t["name"] in args.only.split(",")]
    for trial in trials:
        records = read_jsonl(log_path)
        if any(r["trial"] == trial["name"] and r.get("cap_cpu_s", 0) >= trial.get("cap_cpu_s", CAP)
               for r in records):
            continue
        # a trial resumed under a larger cap: its own earlier records are in its state
        spent = sum(r.get("cpu_s", 0) for r in records if r["trial"] != trial["name"])
        spent += _state(os.path.join(args.runs, trial["name"]))["cpu_s"]
        if spent >= args.budget_hours * 3600 or stop["now"]:
            log(f"budget spent ({spent:.0f} CPU s) or stopped; not starting {trial['name']}")
            break
        t = time.time()
        try:  # the shared token cache: built once per vocabulary, not charged to the trial
            from icl_jax import data
            source = data.make_source(trial_config(trial))
            log(f"{trial['name']}: corpus {source.meta['train']} / {source.meta['eval']}")
        except Exception as e:  # noqa: BLE001
            rec = dict(trial=trial["name"], arg=trial["arg"], cpu_s=0, cap_cpu_s=0,
                       outcome=f"corpus failed: {e!r}"[:300])
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            log(rec["outcome"])
            continue
        build_s = time.time() - t
        ended = train(trial, args.runs, stop)
        if ended == "stopped":
            log("stopped; the trial resumes on the next call")
            break
        rec = summarize(trial, args.runs, ended, build_s)
        with open(log_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        log(f"{trial['name']}: {rec['outcome']}; best PM {rec.get('best_pm')} at "
            f"{rec.get('best_pm_step')}, copying {rec.get('copying')}, ICL {rec.get('icl_first')}"
            f" -> {rec.get('icl_last')}")
        write_doc(read_jsonl(log_path), args.doc, args.budget_hours * 3600, args.runs)
    log("search done")


if __name__ == "__main__":
    main()
