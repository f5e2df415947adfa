"""Faults that must lose nothing: divergence, corrupt snapshots, two writers, signals."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from icl_jax import checkpoints, train, workdir
from conftest import ROOT, tiny_config

DIVERGING = {"train.lr": 1e30, "train.grad_clip": 0.0, "train.warmup_steps": 0}


def test_divergence_names_the_step_and_keeps_the_last_good_snapshot(tmp_path):
    cfg = tiny_config(**DIVERGING)
    with pytest.raises(train.TrainingError, match="diverged at step 2"):
        train.train_and_evaluate(cfg, str(tmp_path), progress=False)
    steps = checkpoints.Store(str(tmp_path), read_only=True).steps()
    assert steps == [0, 1]
    params = checkpoints.Run(str(tmp_path)).params(1)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def test_skip_nonfinite_drops_bad_steps_and_counts_them(tmp_path):
    cfg = tiny_config(**DIVERGING, **{"train.skip_nonfinite": True})
    train.train_and_evaluate(cfg, str(tmp_path), progress=False)
    last = workdir.read_metrics(str(tmp_path))[-1]
    assert last["step"] == 12 and last["skipped_steps"] >= 1
    params = checkpoints.Run(str(tmp_path)).params(12)
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))


def _data_files(snapshot_dir):
    # every data file: which of orbax's ocdbt files the manifest reads varies between runs
    return [f for f in glob.glob(os.path.join(snapshot_dir, "**", "*"), recursive=True)
            if os.path.isfile(f) and "/d/" in f]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_resume_falls_back_past_a_corrupt_snapshot(tmp_path, damage, capfd):
    cfg = tiny_config()
    train.train_and_evaluate(cfg, str(tmp_path / "ref"), progress=False)
    work = str(tmp_path / "run")
    train.train_and_evaluate(cfg, work, progress=False, stop_after=8)
    for victim in _data_files(os.path.join(work, "snapshots", "8")):
        if damage == "truncate":
            with open(victim, "r+b") as f:
                f.truncate(os.path.getsize(victim) // 2)
        else:
            os.remove(victim)
    train.train_and_evaluate(cfg, work, progress=True)
    err = capfd.readouterr().err
    assert "snapshot 8 could not be restored" in err and "resuming from step 4" in err
    assert os.path.isdir(os.path.join(work, "corrupt_snapshots", "8"))  # kept, not overwritten
    a = checkpoints.Run(str(tmp_path / "ref")).params(12)
    b = checkpoints.Run(work).params(12)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_second_writer_on_the_same_workdir_is_refused(tmp_path):
    lock = workdir.Lock(str(tmp_path))
    try:
        with pytest.raises(BlockingIOError, match=f"pid {os.getpid()}"):
            train.train_and_evaluate(tiny_config(), str(tmp_path), progress=False)
    finally:
        lock.release()
    train.train_and_evaluate(tiny_config(), str(tmp_path), progress=False, stop_after=2)


def _train_cmd(workdir, steps):
    return [sys.executable, "-m", "icl_jax", "train", "--config", "small:layers=1",
            "--workdir", workdir, f"--config.train.steps={steps}", "--config.model.d_model=16",
            "--config.eval.n_examples=8", "--config.checkpoint.every=1000",
            "--config.checkpoint.log_spaced=0", "--config.train.log_every=10"]


def _run_until_signal(work, sig, min_step):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(_train_cmd(work, 100_000), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        records = workdir.read_metrics(work)
        if records and records[-1]["step"] >= min_step:
            break
        time.sleep(0.1)
    time.sleep(0.05)  # land between log steps
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "snapshot saved" in err and "run the same command again" in err
    return checkpoints.Store(work, read_only=True).steps()[-1], err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_current_step_and_resume_continues(tmp_path, sig):
    work = str(tmp_path / "w")
    first, _ = _run_until_signal(work, sig, 30)
    assert first >= 30 and first % 1000  # a step of its own, not a scheduled snapshot
    second, err = _run_until_signal(work, sig, first + 20)
    assert f"from step {first}" in err and second > first
    steps = [r["step"] for r in workdir.read_metrics(work)]
    assert steps == sorted(set(steps))  # nothing logged twice across the restart


def test_analyze_skips_a_corrupt_snapshot_with_a_warning(tmp_path, capfd):
    from icl_jax import analysis
    work = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(), work, progress=False)
    for victim in _data_files(os.path.join(work, "snapshots", "12")):
        os.remove(victim)
    result = analysis.analyze([work], out=str(tmp_path / "a"), chunk=4, progress=False)
    assert "skipping snapshot 12" in capfd.readouterr().err
    steps = result["runs"]["run"]["steps"]
    assert steps == [s for s in checkpoints.snapshot_steps(12, 4, 2) if s != 12]
    assert os.path.isdir(os.path.join(work, "snapshots", "12"))  # nothing deleted or moved
