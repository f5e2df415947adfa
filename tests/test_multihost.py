"""Multi-host: two local processes train one run together and match a single process;
a process whose peers never come fails within its timeout, with a message, not a hang."""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from icl_jax import distributed

TINY = ["--config", "small:layers=2",
        "--config.train.steps=4", "--config.model.d_model=16", "--config.eval.n_examples=4",
        "--config.checkpoint.every=2", "--config.checkpoint.log_spaced=0",
        "--config.train.batch_size=8", "--quiet"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICL_JAX_", "SLURM_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _train(workdir, env):
    return subprocess.Popen([sys.executable, "-m", "icl_jax", "train", "--workdir", workdir,
                             *TINY], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)


def test_requested_reads_the_environment(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ICL_JAX_", "JAX_COORDINATOR", "JAX_NUM", "JAX_PROCESS", "SLURM_")):
            monkeypatch.delenv(k)
    assert distributed.requested() is None
    assert distributed.maybe_initialize() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job (a sweep's array task)
    assert distributed.requested() is None
    monkeypatch.setenv("ICL_JAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert distributed.requested() == {"coordinator": "10.0.0.1:1234", "num_processes": 4,
                                       "process_id": 2}
    monkeypatch.setenv("ICL_JAX_PROCESS_ID", "7")
    with pytest.raises(distributed.DistributedError, match="process id 7 must lie in 0..3"):
        distributed.requested()
    monkeypatch.delenv("ICL_JAX_PROCESS_ID")
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(distributed.DistributedError, match="coordinator 10.0.0.1:1234 is set"):
        distributed.requested()
    monkeypatch.setenv("ICL_JAX_DISTRIBUTED", "0")
    assert distributed.requested() is None


def test_missing_peers_fail_within_the_timeout(tmp_path):
    ports = [_free_port(), _free_port()]
    started = time.time()
    # a worker whose coordinator never appears, and a coordinator whose worker never comes
    procs = [_train(str(tmp_path / f"run{i}"),
                    _env(1, ICL_JAX_COORDINATOR=f"127.0.0.1:{ports[i]}",
                         ICL_JAX_NUM_PROCESSES=2, ICL_JAX_PROCESS_ID=1 - i,
                         ICL_JAX_INIT_TIMEOUT=5)) for i in range(2)]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert time.time() - started < 60
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 2, out
        assert (f"error: could not join the multi-host run at coordinator 127.0.0.1:{ports[i]} "
                f"as process {1 - i} of 2 within 5 s") in out, out
        assert "Traceback" not in out and "Check failure" not in out


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    """2 processes x 1 CPU device into one workdir == 1 process x 2 devices."""
    port = _free_port()
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    procs = [_train(multi, _env(1, ICL_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                ICL_JAX_NUM_PROCESSES=2, ICL_JAX_PROCESS_ID=i,
                                ICL_JAX_INIT_TIMEOUT=120)) for i in range(2)]
    procs.append(_train(single, _env(2)))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out

    from icl_jax import checkpoints
    import jax
    a, b = checkpoints.Run(multi), checkpoints.Run(single)
    assert a.steps == b.steps == [0, 2, 4]
    for x, y in zip(jax.tree.leaves(a.params()), jax.tree.leaves(b.params())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in a.metrics]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one writer: no step twice
    assert [r["train_loss"] for r in a.metrics[1:]] == pytest.approx(
        [r["train_loss"] for r in b.metrics[1:]], rel=1e-5)
