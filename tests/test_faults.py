"""Fault injection: a run killed with SIGKILL at random moments, restarted each time,
ends bit for bit where an uninterrupted run ends (CPU, same config and seed)."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from icl_jax import checkpoints, workdir
from conftest import ROOT

pytestmark = pytest.mark.slow

ARGS = ["--config", "small:layers=1", "--config.train.steps=1000",
        "--config.model.d_model=16", "--config.eval.n_examples=8", "--config.train.log_every=10",
        "--config.train.eval_every=50", "--config.checkpoint.every=25",
        "--config.checkpoint.log_spaced=4", "--quiet"]
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")


def _start(workdir):
    return subprocess.Popen([sys.executable, "-m", "icl_jax", "train", "--workdir", workdir, *ARGS],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _saving(workdir):
    """True while orbax has a snapshot in flight (its temporary folder exists)."""
    return bool(glob.glob(os.path.join(workdir, "snapshots", "*tmp*")))


def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    ref = str(tmp_path / "ref")
    assert _start(ref).wait(timeout=600) == 0

    work = str(tmp_path / "killed")
    rng = np.random.default_rng(0)
    kills, during_save, progress = 0, 0, []
    for attempt in range(20):
        before = workdir.read_metrics(work)
        last_step = before[-1]["step"] if before else -1
        proc = _start(work)
        # Wait until this process trains (it logs past where the last one got), then kill
        # it at a random moment, or, every other time, as soon as a save is in flight.
        hunt_save = attempt % 2 == 1
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            records = workdir.read_metrics(work)
            if records and records[-1]["step"] > last_step:
                break
            time.sleep(0.01)
        if hunt_save:
            while proc.poll() is None and not _saving(work) and time.time() < deadline:
                time.sleep(0.002)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break  # finished before we could kill it
        saving = _saving(work)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_save += saving
        progress.append(checkpoints.Store(work, read_only=True).latest())
        if kills >= 6:
            break
    final = _start(work)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err
    print(f"\nkills survived: {kills} ({during_save} during an asynchronous save); "
          f"newest snapshot after each kill: {progress}")
    assert kills >= 5, f"only {kills} kills"

    a = checkpoints.Run(ref).params(1000)
    b = checkpoints.Run(work).params(1000)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # bit for bit on CPU

    ref_steps = [r["step"] for r in workdir.read_metrics(ref)]
    got = workdir.read_metrics(work)
    steps = [r["step"] for r in got]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert set(ref_steps) <= set(steps), f"missing steps: {sorted(set(ref_steps) - set(steps))}"
    ref_loss = {r["step"]: r["train_loss"] for r in workdir.read_metrics(ref)}
    for r in got:
        if r["step"] in ref_loss and r["train_loss"] is not None:
            assert r["train_loss"] == ref_loss[r["step"]]
