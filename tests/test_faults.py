"""Fault injection: runs killed with SIGKILL at chosen and random moments, restarted each
time, end bit for bit where an uninterrupted run ends (CPU, same config and seed), with no
metrics step logged twice. One run killed from its first seconds on (before and during the
compile, during the step-0 evaluation, during and right after snapshot 0, then in training
and mid-save); an ensemble killed mid-way through its members' saves. A run in a bucket
killed once and resumed is test_gcs.py's test_train_kill_resume_analyze_export_in_a_bucket;
the kills at chosen moments are not repeated there (each costs a fake server's round trips)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from icl_jax import checkpoints, workdir
from conftest import ROOT, tiny_args

pytestmark = pytest.mark.slow

STEPS = 200
FIELDS = {"train.steps": STEPS, "train.log_every": 10, "train.eval_every": 50,
          "checkpoint.every": 25, "checkpoint.log_spaced": 0}
ARGS = tiny_args("layers=1", **FIELDS)  # not --quiet: the log says when the step is compiled
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def cached(env, folder) -> dict:
    """`env` with a persistent compilation cache in `folder`, so that a restart loads the
    step its killed predecessor compiled (as a sweep's members do) instead of compiling it
    again: the first attempts, which find it empty, are killed before or just after their
    compile; the cache only makes the test shorter."""
    return dict(env, JAX_COMPILATION_CACHE_DIR=str(folder),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
COMPILED = "compiled train step"

# the first seconds of a fresh run, each killed once in this order, then training
FIRST_SECONDS = ("before the step is compiled", "the step-0 evaluation", "saving snapshot 0",
                 "right after snapshot 0")
TRAINING = ("training", "mid-save")


def _committed(work) -> set[int]:
    return set(workdir.snapshot_steps(work))


def _in_flight(work) -> set[str]:
    """Snapshot folders not (yet) committed: a save under way (locally orbax's tmp folder, in
    a bucket a step folder without its commit marker)."""
    try:
        names = {p.name for p in workdir.snapshots_dir(work).iterdir()}
    except (FileNotFoundError, NotADirectoryError):
        return set()
    return names - {str(s) for s in _committed(work)}


def _log_says(log, text) -> bool:
    with open(log, errors="replace") as f:
        return text in f.read()


def _start(command, log, env):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "icl_jax", *command], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)


def timed_reference(command, log, env=ENV) -> float:
    """Runs `command` to the end; returns the seconds it took to compile its step."""
    t0 = time.time()
    proc = _start(command, log, env)
    compiled_at = None
    while proc.poll() is None:
        if compiled_at is None and _log_says(log, COMPILED):
            compiled_at = time.time() - t0
        time.sleep(0.05)
    assert proc.returncode == 0, open(log).read()[-3000:]
    return compiled_at or time.time() - t0


def _last_logged(work) -> int:
    records = workdir.read_metrics(work)
    return records[-1]["step"] if records else -1


def _kill(proc, works):
    """SIGKILLs `proc`; returns each workdir's newest snapshot then and whether a save was in
    flight."""
    saving = any(_in_flight(w) for w in works)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return [workdir.newest_snapshot(w) for w in works], saving


def kill_at(moments, command, works, logs, rng, t_compiled, env=ENV, poll=0.002):
    """Starts `command` (which trains into `works`, one workdir per ensemble member) once per
    moment and SIGKILLs it then; at last runs it to the end. Returns, per kill, (moment,
    each workdir's newest snapshot after it, whether a save was in flight when it came).

    The first seconds are those of a fresh run (no snapshot yet), or right after snapshot 0;
    "training" comes at a random moment in the second after the restart commits a snapshot
    past the one it resumed from (waiting on the run, not on the clock, so that a loaded
    machine, where a step takes longer, still sees the restarts get further); "mid-save"
    once it has logged a step past where the one before got and a new save is in flight;
    "between members' saves" the moment one member of an ensemble commits a snapshot newer
    than all of them held."""
    kills = []
    for n, moment in enumerate(moments):
        log = os.path.join(logs, f"attempt{n}.log")
        last = _last_logged(works[0])
        proc = _start(command, log, env)
        deadline = time.time() + 300

        def wait(ready):
            while proc.poll() is None and time.time() < deadline and not ready():
                time.sleep(poll)

        if moment == "before the step is compiled":  # imports, data, restore or compile
            time.sleep(rng.uniform(0.0, t_compiled))
        elif moment == "the step-0 evaluation":  # what follows the compile
            wait(lambda: _log_says(log, COMPILED))
        elif moment == "saving snapshot 0":
            wait(lambda: any(_in_flight(w) for w in works))
        elif moment == "right after snapshot 0":
            wait(lambda: all(0 in _committed(w) for w in works))
        else:
            wait(lambda: _log_says(log, COMPILED))  # (the restore's leftovers cleaned)
            before = [_in_flight(w) for w in works]
            common = min(max(_committed(w), default=-1) for w in works)
            if moment == "between members' saves":  # as soon as one member's save commits
                wait(lambda: any(max(_committed(w), default=-1) > common for w in works))
            elif moment == "training":  # once a snapshot past the resumed one has committed
                wait(lambda: all(max(_committed(w), default=-1) > common for w in works))
                time.sleep(rng.uniform(0.0, 1.0))
            else:  # mid-save
                wait(lambda: _last_logged(works[0]) > last)
                wait(lambda: any(_in_flight(w) - b for w, b in zip(works, before)))
        if proc.poll() is not None:
            break  # it finished (or failed: the final run says) before the moment came
        newest, saving = _kill(proc, works)
        if moment == "between members' saves" and len(set(newest)) == 1:
            # the members' commits came closer together than a poll: leave what a kill
            # between them leaves, the last member without the newest snapshot
            shutil.rmtree(workdir.snapshots_dir(works[-1]) / str(newest[-1]))
            newest = [workdir.newest_snapshot(w) for w in works]
        kills.append((moment, newest, saving))
    final = os.path.join(logs, "final.log")
    proc = _start(command, final, env)
    assert proc.wait(timeout=600) == 0, open(final).read()[-3000:]
    return kills


def _same_record(a: dict, b: dict) -> bool:
    timing = ("tokens_per_s", "mfu")
    return {k: v for k, v in a.items() if k not in timing} == \
           {k: v for k, v in b.items() if k not in timing}


def assert_same_run(ref, work, step):
    """Bit for bit the same params at `step`, and the same metrics, each step logged once."""
    a = checkpoints.Run(ref).params(step)
    b = checkpoints.Run(work).params(step)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bit for bit on CPU
    want, got = workdir.read_metrics(ref), workdir.read_metrics(work)
    steps = [r["step"] for r in got]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    assert steps == [r["step"] for r in want]
    bad = [r["step"] for r, s in zip(got, want) if not _same_record(r, s)]
    assert not bad, f"metrics differ at steps {bad[:5]}"


def test_sigkill_from_the_first_seconds_on_loses_nothing(tmp_path):
    ref = str(tmp_path / "ref")
    t_compiled = timed_reference(["train", "--workdir", ref, *ARGS], str(tmp_path / "ref.log"))
    work = str(tmp_path / "killed")
    moments = FIRST_SECONDS + TRAINING
    kills = kill_at(moments, ["train", "--workdir", work, *ARGS], [work], str(tmp_path),
                    np.random.default_rng(0), t_compiled, env=cached(ENV, tmp_path / "cache"))
    print(f"\n{len(kills)} kills: " + "; ".join(f"{m} (then newest snapshot {s[0]}"
                                                f"{', mid-save' if saving else ''})"
                                                for m, s, saving in kills))
    assert len(kills) == len(moments), kills
    # and restarts got on from there
    assert max((s[0] for _, s, _ in kills if s[0] is not None), default=-1) >= 25, kills
    # the first two kills found no snapshot; one left snapshot 0 as the newest (the restart
    # resumes from it and must not save step 0 again); some came while a save was in flight
    assert [s for _, s, _ in kills[:2]] == [[None], [None]], kills
    assert [0] in [s for _, s, _ in kills], kills
    assert sum(saving for *_, saving in kills) >= 2, kills
    assert_same_run(ref, work, STEPS)


def _ensemble_sweep(tmp_path) -> str:
    """Two seeds that `icl-jax sweep --ensemble` trains as one vmapped ensemble."""
    path = tmp_path / "seeds.py"
    overrides = dict(a[len("--config."):].split("=", 1) for a in ARGS[2:])
    path.write_text(f"def get_sweep(arg=None):\n    return {{'base': {ARGS[1]!r}, "
                    f"'overrides': {overrides!r}, "
                    "'members': {'s0': {'overrides': {'seed': 0}}, "
                    "'s1': {'overrides': {'seed': 1}}}}\n")
    return str(path)


def test_sigkill_mid_way_through_an_ensembles_saves_loses_nothing(tmp_path):
    """The members of an ensemble save one after another: killed between them, their newest
    snapshots differ, and the restart resumes every member from the newest step they all
    hold (saving again, bit for bit, the steps some already had)."""
    spec = _ensemble_sweep(tmp_path)
    names = ("s0", "s1")

    def sweep(root):
        return ["sweep", "--config", spec, "--workdir", root, "--ensemble"]
    ref = str(tmp_path / "ref")
    t_compiled = timed_reference(sweep(ref), str(tmp_path / "ref.log"))
    root = str(tmp_path / "killed")
    works = [os.path.join(root, n) for n in names]
    kills = kill_at(("right after snapshot 0", "mid-save", "between members' saves"),
                    sweep(root), works,
                    str(tmp_path), np.random.default_rng(1), t_compiled)
    print(f"\n{len(kills)} kills: " + "; ".join(f"{m} (then newest snapshots {s}"
                                                f"{', mid-save' if saving else ''})"
                                                for m, s, saving in kills))
    assert len(kills) == 3 and kills[1][2], kills  # the mid-save kill found a save in flight
    # the last kill left the members' newest snapshots different: the restart resumed them
    # all from the newest step they shared and saved again the one a member already had
    assert len(set(kills[-1][1])) == 2, kills
    for n in names:
        assert_same_run(os.path.join(ref, n), os.path.join(root, n), STEPS)
