"""From snapshots to numbers: scores of every snapshot, the phase change, the PCA.

analyze(["runs/2l", "runs/1l"]) opens every run once, scores each snapshot
(scores.snapshot_scores, one jitted call per chunk of snapshots, vmapped or mapped),
finds the phase change, fits one PCA over all runs and writes scores.json and pca.json;
report.py then draws the figures and report.html from what it returns. The pure pieces
(stats.py: the phase-change rule and the PCA; induction_heads) are usable on their own.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import time

import jax
import numpy as np

from icl_jax import checkpoints, data as data_lib, scores, stats, workdir as workdir_lib
# the statistics live in stats.py (pure numpy); these names stay for callers of analysis
from icl_jax.stats import (detect_phase_change, fit_pca, gaussian_smooth,  # noqa: F401
                           paired_standard_error,
                           phase_change_of, shared_pca)


# ----------------------------------------------------------------------------- induction heads

def induction_heads(prefix_matching_LH, copying_LH, prefix_threshold: float,
                    copying_threshold: float) -> list[list[int]]:
    """[[layer, head], ...] of the heads above both thresholds (one snapshot's scores)."""
    pm, cp = np.asarray(prefix_matching_LH), np.asarray(copying_LH)
    return [[int(l), int(h)] for l, h in zip(*np.nonzero((pm > prefix_threshold)
                                                         & (cp > copying_threshold)))]


# ----------------------------------------------------------------------------- scoring

def scorer(model, early: int, late: int, n_tokens: int, ablation: str = "pattern",
           stacking: str | None = None):
    """scores.snapshot_scores jitted: fn(params, inputs) for one snapshot (stacking None), or
    fn(stacked params, inputs) for snapshots stacked on a leading axis (stacking "vmap":
    jax.vmap; "map": jax.lax.map). Cached by architecture, so analysing several runs of one
    shape compiles once."""
    if stacking is not None and stacking not in scores.STACKING:
        raise ValueError(f"stacking must be one of {scores.STACKING} or None, got {stacking!r}")
    return _scorer(model, early, late, n_tokens, ablation, stacking)


@functools.lru_cache(maxsize=8)
def _scorer(model, early, late, n_tokens, ablation, stacking):
    # a Transformer hashes and compares by its config and kernel: the cache key

    def one(params, inputs):
        return scores.snapshot_scores(model, params, inputs, early, late, n_tokens, ablation)

    if stacking == "vmap":
        program = jax.jit(jax.vmap(one, in_axes=(0, None)))
    elif stacking == "map":
        program = jax.jit(lambda stacked, inputs: jax.lax.map(lambda p: one(p, inputs), stacked))
    else:
        program = jax.jit(one)

    def score(params, inputs):
        out = dict(program(params, inputs))
        out["copying"] = scores.copying_from_ov_products(jax.device_get(out.pop("ov_products")))
        return out

    score.program = program  # the compiled part, for lowering and benchmarks
    return score


@dataclasses.dataclass
class LastSnapshot:
    """What the figures and the claims need of a run's last scored snapshot, kept from the
    scoring so that nothing restores it again: the run (config, model, workdir), the step,
    its params, the evaluation inputs and the attention on the first probe sequence."""
    run: checkpoints.Run
    step: int
    params: dict
    inputs: dict
    probe_attention_LHTS: np.ndarray


def open_run(workdir: str, measure: dict | None = None) -> checkpoints.Run:
    """The run in `workdir`; FileNotFoundError naming it if it holds no run or no snapshot.
    measure: overrides of its eval and llc fields ({"eval.n_examples": 1024}) to measure it
    with (config.MEASUREMENT; ConfigError for any other field)."""
    from icl_jax import config as config_lib
    measure = config_lib.measurement_overrides(measure)
    run = checkpoints.Run(workdir)
    if not run.steps:
        raise FileNotFoundError(f"{workdir!r} has no snapshots yet")
    if measure:
        run.config = config_lib.with_overrides(run.config, measure)
    return run


def _stack(trees):
    return jax.tree.map(lambda *a: np.stack(a), *trees)


def snapshot_bytes(config) -> int:
    """A generous estimate of the device memory scoring one snapshot takes in a vmapped chunk:
    three float32 copies of the evaluation set's logits (logits, log-softmax, the ablation's
    second run) and two of its attention patterns. At Hoogland et al.'s text shape (512
    examples x 1024 tokens x 5,000 tokens of vocabulary) that is ~34 GB: a chunk of 16 is
    more than a GPU holds."""
    m, e = config.model, config.eval
    logits = e.n_examples * m.context * m.vocab_size * 4
    attention = e.n_examples * m.n_layers * m.n_heads * m.context ** 2 * 4
    return 3 * logits + 2 * attention


def device_memory() -> int | None:
    """Bytes the default device's allocator may hold; None where it does not say (CPUs)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends do not implement memory_stats
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def fitting_chunk(chunk: int, config, stacking: str, memory: int | None) -> int:
    """`chunk`, or fewer snapshots if a vmapped chunk would take more than half of `memory`
    (lax.map holds one snapshot's intermediates at a time, and a device that does not say
    what it holds is not second-guessed)."""
    if stacking != "vmap" or not memory:
        return chunk
    return max(1, min(chunk, int(memory // 2 // snapshot_bytes(config))))


def _out_of_memory(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def score_run(run: checkpoints.Run, chunk: int = 16, ablation: str = "pattern",
              progress: bool = True, stacking: str | None = None, llc: bool = False,
              llc_heads=None):
    """(per-snapshot scores as numpy arrays [N, ...], LastSnapshot) of every snapshot of a run.

    Snapshots are restored `chunk` at a time, stacked on a leading axis and scored in
    one jitted call (vmapped, or mapped on CPU: see scores.default_stacking); the last chunk is
    padded to `chunk` (by repeating its last snapshot) so that every call has the same
    shape and nothing recompiles. Fewer snapshots go in a call where `chunk` would not fit in
    the device's memory (fitting_chunk; and half as many each time it runs out). A snapshot
    that cannot be restored is skipped, warned of.
    llc: also the local learning coefficient of each chunk (llc.llc_over_snapshots, the
    run's `llc` config section, batches from its held-out data), under the keys llc,
    llc_std, llc_loss_trace [N, chain, draw], and llc_diverged / llc_messages.
    llc_heads: a head_llc.HeadView: also every head's refined LLC, under the key llc_heads
    (head_llc.Recorder.record).
    """
    e, name = run.config.eval, run.workdir
    source = data_lib.make_source(run.config, run.workdir)
    inputs = scores.evaluation_inputs(run.config, source)
    stacking = stacking or scores.default_stacking()
    score = scorer(run.model, e.icl_early_index, e.icl_late_index, e.probe_tokens, ablation,
                   stacking)
    size = fitting_chunk(chunk, run.config, stacking, device_memory())  # snapshots a call
    if size < chunk and progress:
        print(f"scoring {name}: {size} snapshots a call, not {chunk}: a chunk of {chunk} would "
              f"not fit in the device's memory", file=sys.stderr)
    steps, results, t0 = run.steps, [], time.perf_counter()
    good, last, llcs = [], None, []
    if llc:
        from icl_jax import llc as llc_lib
        llc_pool = llc_lib.held_out_pool(source, run.config)
    if llc_heads:
        from icl_jax import head_llc
        heads = head_llc.Recorder(run, source, llc_heads, stacking, chunk)

    def scored(trees):
        """Scores `trees` in calls of `size` snapshots (the last padded by repeating its last
        snapshot, so that nothing recompiles), halving `size` each time the device runs out
        of memory; appends to results; the last snapshot's probe attention and index."""
        nonlocal size
        n = len(trees)
        try:
            out = score(_stack(trees + [trees[-1]] * (size - n)), inputs)
        except jax.errors.JaxRuntimeError as err:
            if not _out_of_memory(err) or size == 1:
                raise
            size //= 2
            print(f"warning: scoring {name}: out of device memory; {size} snapshots a call "
                  f"from now on (--chunk {size} skips this)", file=sys.stderr)
            i = 0
            while i < n:  # `size` may shrink again inside: the piece's end is taken first
                j = i + size
                tail, i = scored(trees[i:j]), j
            return tail
        attention = out.pop("probe_attention")  # only the last snapshot's leaves the device
        results.append(jax.tree.map(lambda a: a[:n], jax.device_get(out)))
        return attention, n - 1

    def score_chunk(trees):
        nonlocal last
        n = len(trees)
        if llc:
            llcs.append(llc_lib.llc_over_snapshots(
                run.model, trees, llc_pool, run.config.llc, steps=good[len(good) - n:],
                seed=run.config.seed, stacking=stacking, chunk=chunk))
        if llc_heads:
            heads.add(trees, good[len(good) - n:])
        last = (trees[-1], *scored(trees))
        if progress:
            print(f"scoring {name}: {len(good)}/{len(steps)} snapshots "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)

    trees = []
    for step in steps:
        try:
            tree = run.params(step)
        except Exception as e:  # a damaged snapshot costs itself, not the analysis
            print(f"warning: skipping snapshot {step} of {name}: it cannot be restored "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:160]})", file=sys.stderr)
            continue
        good.append(step)
        trees.append(tree)
        if len(trees) == chunk:
            score_chunk(trees)
            trees = []
    if trees:
        score_chunk(trees)
    if not good:
        raise FileNotFoundError(f"no snapshot of {name!r} can be restored")
    per = jax.tree.map(lambda *a: np.concatenate(a), *results)
    if llc:
        for key, out_key in (("llc", "llc"), ("llc_std", "llc_std"),
                             ("loss_trace", "llc_loss_trace")):
            per[out_key] = np.concatenate([c[key] for c in llcs])
        per["llc_diverged"] = [d for c in llcs for d in c["diverged"]]
        per["llc_messages"] = [m for c in llcs for m in c["messages"]]
        for m in per["llc_messages"]:
            print(f"warning: {name}: {m}", file=sys.stderr)
    if llc_heads:
        per["llc_heads"] = heads.record()
        for m in per["llc_heads"]["messages"]:
            print(f"warning: {name}: {m}", file=sys.stderr)
    per["steps"] = np.asarray(good)
    per["tokens"] = per["steps"] * (run.config.train.batch_size * run.config.model.context)
    params, attention, i = last
    return per, LastSnapshot(run, good[-1], params, inputs, np.asarray(attention[i]))


# ----------------------------------------------------------------------------- analyze

def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _run_names(workdirs):
    names = []
    for w in workdirs:
        base = os.path.basename(os.path.normpath(w)) or "run"
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def untrained_icl_note(s) -> str | None:
    """A sentence on the untrained model's ICL score (step 0) where the run has one: it is
    not in-context learning (docs/measurements.md, "The untrained model's ICL score")."""
    steps = list(s["steps"])
    if not steps or steps[0] != 0:
        return None
    return (f"At step 0 (untrained) the ICL score is {float(s['icl_score'][0]):+.2f}: random "
            "logits vary more at early context indices, where attention averages fewer "
            "positions, and larger random logits cost more loss; that, not in-context "
            "learning, makes an untrained model's score negative (more so with depth).")


def held_out_loss(metrics) -> dict:
    """{"steps", "loss"}: the held-out loss at every evaluation of a run's metrics.jsonl
    (the curve the paper's loss bump is read from)."""
    recs = [(int(r["step"]), float(r["eval_loss"])) for r in metrics
            if r.get("eval_loss") is not None]
    return {"steps": [s for s, _ in recs], "loss": [v for _, v in recs]}


def model_shape(model_config) -> dict:
    """What the claims need of a run's model: its layers, heads and widths, and whether it
    has MLPs and smeared keys."""
    m = model_config
    return {"n_layers": int(m.n_layers), "n_heads": int(m.n_heads), "d_model": int(m.d_model),
            "d_head": int(m.d_head or m.d_model // m.n_heads), "mlp": bool(m.mlp),
            "smear_keys": bool(m.smear_keys)}


def _record(name, run, s, ablation) -> dict:
    """What scores.json holds for one run."""
    e = run.config.eval
    return {
        "name": name, "workdir": workdir_lib.absolute(run.workdir),
        "model": model_shape(run.config.model), "eval_loss": held_out_loss(run.metrics),
        "icl_indices": {"early": e.icl_early_index, "late": e.icl_late_index},
        "ablation_kind": ablation,
        "thresholds": {"prefix_matching": e.induction_prefix_threshold,
                       "copying": e.induction_copying_threshold},
        "steps": s["steps"], "tokens": s["tokens"], "icl_score": s["icl_score"],
        "icl_se": s["icl_se"], "icl_by_example": s["icl_by_example"],
        "loss_by_example": s.get("loss_by_example"),
        "loss_by_position": s["loss_by_position"],
        "prefix_matching": s["prefix_matching"], "previous_token": s["previous_token"],
        "copying": s["copying"], "copying_empirical": s["copying_empirical"],
        "ablation_icl": s["ablation_icl"], "composition": s["composition"],
        "per_token_loss": s["per_token_loss"],
        **{k: s[k] for k in ("llc", "llc_std", "llc_loss_trace", "llc_diverged",
                             "llc_messages", "llc_heads") if k in s},
        "phase_change": phase_change_of(s),
        "untrained_icl_note": untrained_icl_note(s),
        "induction_heads": induction_heads(s["prefix_matching"][-1], s["copying"][-1],
                                           e.induction_prefix_threshold,
                                           e.induction_copying_threshold),
    }


# the modules whose code decides a snapshot's scores (this one too: scorer, score_run): an
# edit to any of them rescores
SCORING_CODE = ("analysis", "scores", "model", "data", "corpus", "llc", "head_llc")
# what a saved scores.json keeps per snapshot (the rest, phase change and induction heads,
# is derived again by _record with the code as it stands)
_PER_SNAPSHOT = ("icl_score", "icl_se", "icl_by_example", "loss_by_example", "loss_by_position",
                 "prefix_matching",
                 "previous_token", "copying", "copying_empirical", "ablation_icl",
                 "per_token_loss", "llc", "llc_std", "llc_loss_trace")


@functools.lru_cache(maxsize=None)
def code_digest(modules: tuple[str, ...] | None = None) -> str:
    """A digest of the source of the package's `modules` (names under icl_jax; default
    every module of the package, its configs included)."""
    import importlib
    h = hashlib.sha256()
    if modules is None:
        root = pathlib.Path(__file__).parent
        files = sorted(root.rglob("*.py"))
    else:
        files = [pathlib.Path(importlib.import_module(f"icl_jax.{name}").__file__)
                 for name in modules]
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def scoring_key(run: checkpoints.Run, ablation: str, llc: bool, steps=None,
                llc_heads=None) -> str:
    """A digest of everything a run's scores follow from: the snapshots scored (`steps`;
    default: every snapshot the run holds now), each with what it holds (Run.snapshot_id),
    its whole config, the ablation kind, whether the LLC is estimated (and every head's: a
    HeadView), and the scoring code. A scores.json keyed on the snapshots it scored is
    reused only while the run holds those same snapshots: one added, repaired or saved
    again since is scored."""
    steps = run.steps if steps is None else steps
    heads = {"llc_heads": dataclasses.asdict(llc_heads)} if llc_heads else {}
    what = json.dumps({"snapshots": [[int(s), run.snapshot_id(int(s))] for s in steps],
                       "config": run.config.to_dict(),
                       "ablation": ablation, "llc": bool(llc), "code": code_digest(SCORING_CODE), **heads},
                      sort_keys=True, default=str)
    return hashlib.sha256(what.encode()).hexdigest()[:24]


def saved_scores(path, key: str) -> dict | None:
    """The per-snapshot scores of a scores.json written under the same scoring_key (numeric
    series as numpy arrays), or None: no file, an unreadable one, or other settings."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return _per_snapshot(saved) if saved.get("scored_with") == key else None


def _per_snapshot(saved: dict) -> dict:
    """Per-snapshot scores as saved (lists, rounded, None for non-finite) -> numpy arrays."""
    per = {k: (np.asarray(v, dtype=float) if k in _PER_SNAPSHOT and v is not None else v)
           for k, v in saved.items()}
    per["steps"], per["tokens"] = np.asarray(saved["steps"]), np.asarray(saved["tokens"])
    return per


def last_snapshot(run: checkpoints.Run, step: int) -> LastSnapshot:
    """The LastSnapshot score_run would have kept, for a run whose scores are reused: its
    params, the evaluation inputs and the attention on the first probe sequence."""
    source = data_lib.make_source(run.config, run.workdir)
    inputs = scores.evaluation_inputs(run.config, source)
    params = run.params(step)
    _, cache = run.model.apply({"params": params}, inputs["probe_BT"][:1])  # the figure's one
    return LastSnapshot(run, step, params, inputs, np.asarray(cache["attention"][0]))


def analyze(workdirs, out: str | None = None, chunk: int = 16, progress: bool = True,
            ablation: str = "pattern", llc=False, rescore: bool = False,
            measure: dict | None = None, llc_heads=None) -> dict:
    """Scores every snapshot of every run and writes scores.json and pca.json; the figures
    and report.html are report.write_report's, from what this returns.

    A run whose scores.json was written under the same scoring_key (same snapshots, config,
    ablation, LLC or not, and scoring code) is not scored again: its per-snapshot scores are
    read back (the phase change and induction heads derived again) and only its last
    snapshot is restored, for the figures. rescore: score every run regardless.
    measure: eval and llc overrides every run is measured with instead of its saved values
    (more evaluation examples for a less noisy ICL score, for example); see open_run.

    One run: everything goes to `out` (default <workdir>/analysis). Several runs: each
    run's files go to out/<run name>/ and the shared PCA and report to `out` (default
    <common parent>/analysis). Returns {"runs": {name: scores}, "pca": {...}, "out": dir,
    "last": {name: LastSnapshot}} where scores is what scores.json holds (lists), with the
    run's "workdir". llc: True estimates the local learning coefficient of every snapshot of
    every run (see score_run), or a collection of run names, of those runs only. llc_heads:
    a head_llc.HeadView, every head's refined LLC of every run, or {run name: HeadView}, of
    those runs only (score_run).
    """
    if isinstance(workdirs, str):
        workdirs = [workdirs]
    if not workdirs:
        raise FileNotFoundError("no workdir given; pass at least one run's --workdir")
    names = _run_names(workdirs)
    single = len(workdirs) == 1
    if out is None:
        out = (str(workdir_lib.path(workdirs[0]) / "analysis") if single else
               os.path.join(os.path.commonpath([workdir_lib.absolute(w) for w in workdirs]),
                            "analysis"))
    opened = {name: open_run(w, measure) for name, w in zip(names, workdirs)}  # fail fast
    runs, last = {}, {}
    for name, run in opened.items():
        with_llc = llc is True or (bool(llc) and name in llc)
        run_dir = workdir_lib.path(out) if single else workdir_lib.path(out) / name
        view = llc_heads.get(name) if isinstance(llc_heads, dict) else llc_heads
        key = scoring_key(run, ablation, with_llc, llc_heads=view)
        per = None if rescore else saved_scores(run_dir / "scores.json", key)
        if per is not None:
            last[name] = last_snapshot(run, int(per["steps"][-1]))
            if progress:
                print(f"scoring {run.workdir}: reusing {run_dir / 'scores.json'} (same "
                      f"{len(per['steps'])} snapshots, config, ablation and scoring code; "
                      "--rescore scores again)", file=sys.stderr, flush=True)
        else:
            per, last[name] = score_run(run, chunk, ablation, progress, llc=with_llc,
                                        llc_heads=view)
            # derived from the numbers as saved, so that a reuse derives the same
            per = _per_snapshot(_jsonable(per))
        # keyed on the snapshots scored (a damaged one skipped is scored once repaired)
        key = scoring_key(run, ablation, with_llc, per["steps"], llc_heads=view)
        runs[name] = _jsonable({**_record(name, run, per, ablation), "scored_with": key})
        workdir_lib.write_text(run_dir / "scores.json", json.dumps(runs[name]))
    pca = shared_pca(runs)
    workdir_lib.write_text(workdir_lib.path(out) / "pca.json", json.dumps(_jsonable(pca)))
    result = {"runs": runs, "pca": pca, "out": out, "last": last}
    return result


def headline(result) -> list[dict]:
    """One row of headline numbers per run (what the report's table shows)."""
    rows = []
    for name, run in result["runs"].items():
        pc = run["phase_change"]
        pm = np.asarray(run["prefix_matching"][-1])
        abl = np.asarray(run["ablation_icl"][-1])
        traj = result["pca"]["trajectories"].get(name, {})
        rows.append({
            "run": name, "layers": pm.shape[0], "heads": pm.shape[1],
            "last step": run["steps"][-1], "snapshots": len(run["steps"]),
            "ICL score (last)": run["icl_score"][-1],
            "phase change": (f"steps {pc['start_step']}–{pc['end_step']} "
                             f"(tokens {pc['start_tokens']:,}–{pc['end_tokens']:,})"
                             if pc["detected"] else f"none ({pc['reason']})"),
            "ICL before → after": (f"{pc['icl_before']:.3f} → {pc['icl_after']:.3f}"
                                   if pc["detected"] else "–"),
            "max prefix matching (last)": float(pm.max()),
            "induction heads": ", ".join(f"L{l}H{h}" for l, h in run["induction_heads"]) or "none",
            "largest ablation effect": (f"L{np.unravel_index(abl.argmax(), abl.shape)[0]}"
                                        f"H{np.unravel_index(abl.argmax(), abl.shape)[1]} "
                                        f"+{abl.max():.3f}"),
            "PCA at the phase change": ((traj.get("pivot") or {}).get("note") or "–"),
        })
    return rows
