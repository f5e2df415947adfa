"""Sweeps: member resolution and validation, ensemble grouping, dry runs, launch scripts,
and one real two-member sweep end to end."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, tiny_config
from icl_jax import cli, sweep
from icl_jax.config import ConfigError

PAPER = "paper_small"  # the built-in sweep
TINY = {"train.steps": "4", "model.d_model": "16", "eval.n_examples": "4",
        "checkpoint.every": "2", "checkpoint.log_spaced": "0", "train.batch_size": "8"}


def _write_sweep(tmp_path, members, overrides=None):
    path = tmp_path / "my_sweep.py"
    path.write_text(f"def get_sweep(arg=None):\n    return {{'base': "
                    f"{SMALL + ':layers=1'!r}, 'overrides': "
                    f"{overrides or {}!r}, 'members': {members!r}}}\n")
    return str(path)


def test_paper_small_has_the_papers_family(tmp_path):
    members = sweep.resolve(PAPER, str(tmp_path))
    by_name = {m.name: m.config.model for m in members}
    assert len(by_name) == len(members) == 14
    for n in range(1, 7):
        assert by_name[f"{n}l"].n_layers == n and not by_name[f"{n}l"].mlp
        assert by_name[f"{n}l-mlp"].n_layers == n and by_name[f"{n}l-mlp"].mlp
    for n in (1, 2):
        assert by_name[f"{n}l-smear"].smear_keys and by_name[f"{n}l-smear"].n_layers == n
    assert not any(by_name[f"{n}l"].smear_keys for n in range(1, 7))
    assert all(m.workdir == os.path.join(str(tmp_path), m.name) for m in members)

    attn = sweep.resolve(PAPER + ":attn,steps=300", str(tmp_path))
    assert [m.name for m in attn] == [f"{n}l" for n in range(1, 7)]
    assert {m.config.train.steps for m in attn} == {300}
    picked = sweep.resolve(PAPER, str(tmp_path), members=["2l-smear", "1l"])
    assert [m.name for m in picked] == ["1l", "2l-smear"]  # the sweep's order
    with pytest.raises(ConfigError, match="unknown sweep member.*'7l'"):
        sweep.resolve(PAPER, str(tmp_path), members=["7l"])
    with pytest.raises(ConfigError, match="unknown subset 'bogus'"):
        sweep.resolve(PAPER + ":bogus", str(tmp_path))


def test_product_names_and_overrides(tmp_path):
    members = sweep.resolve("lrs:seeds=2",
                            str(tmp_path))
    assert [m.name for m in members] == ["lr=3e-4_seed=0", "lr=3e-4_seed=1", "lr=1e-3_seed=0",
                                         "lr=1e-3_seed=1", "lr=3e-3_seed=0", "lr=3e-3_seed=1"]
    assert members[0].config.train.lr == pytest.approx(3e-4) and members[1].config.seed == 1
    seeds = sweep.resolve("seeds", str(tmp_path))
    assert [m.config.seed for m in seeds] == [0, 1, 2, 3]
    assert {m.config.model.n_layers for m in seeds} == {2}


def test_a_bad_member_is_named_before_anything_runs(tmp_path):
    spec = _write_sweep(tmp_path, {"good": {}, "bad": {"overrides": {"model.context": 3}}})
    with pytest.raises(ConfigError, match=r"sweep member 'bad': config field 'model.context'"):
        sweep.run_sweep(spec, str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()  # nothing started, no index
    spec = _write_sweep(tmp_path, {"typo": {"overrides": {"train.stepz": 3}}})
    with pytest.raises(ConfigError, match=r"sweep member 'typo': unknown config field 'train.stepz'"):
        sweep.resolve(spec, str(tmp_path))
    spec = _write_sweep(tmp_path, {"a/b": {}})
    with pytest.raises(ConfigError, match="member name 'a/b'"):
        sweep.resolve(spec, str(tmp_path))
    # on the command line: one line, exit status 2
    assert cli.main(["sweep", "--config", _write_sweep(tmp_path, {"x": {"arg": "layers=0"}}),
                     "--workdir", str(tmp_path / "r"), "--dry-run"]) == 2


def test_ensemble_key_groups_seeds_and_lrs_not_shapes(tmp_path):
    key = lambda ms: {sweep.ensemble_key(m.config) for m in ms}
    assert len(key(sweep.resolve("seeds", str(tmp_path)))) == 1
    assert len(key(sweep.resolve("lrs", str(tmp_path)))) == 1
    paper = sweep.resolve(PAPER, str(tmp_path))
    assert len(key(paper)) == 14  # layers, MLPs and smearing all change the program
    from icl_jax import train
    if hasattr(train, "ensemble_mismatch"):  # the same rule as train_ensemble's check
        by = {m.name: m.config for m in paper}
        assert train.ensemble_mismatch([by["1l"], by["2l"]]) == "model.n_layers"
        lrs = [m.config for m in sweep.resolve("lrs", str(tmp_path))]
        assert train.ensemble_mismatch(lrs) is None


def test_dry_run_prints_every_members_command(tmp_path, capsys):
    wd = str(tmp_path / "ps")
    assert cli.main(["sweep", "--config", PAPER + ":smear", "--workdir", wd, "--dry-run",
                     "--jobs", "2", "--config.train.steps=50"]) == 0
    out = capsys.readouterr().out.splitlines()
    commands = [line for line in out if not line.startswith("#")]
    assert len(commands) == 2
    # two at a time: the costlier member (two layers) starts first
    assert f"--workdir {wd}/2l-smear" in commands[0] and "--config.train.steps=50" in commands[0]
    assert f"--workdir {wd}/1l-smear" in commands[1] and "layers=1,smear=true" in commands[1]
    assert all(" -m icl_jax train --config " in c for c in commands)
    assert any("xla_cpu_multi_thread_eigen=false" in line for line in out if line.startswith("#"))
    assert not os.path.exists(wd)
    # one at a time: the sweep's own order
    assert cli.main(["sweep", "--config", PAPER + ":smear", "--workdir", wd, "--dry-run",
                     "--config.train.steps=50"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [c.split("--workdir ")[1].split()[0] for c in commands] == [f"{wd}/1l-smear",
                                                                       f"{wd}/2l-smear"]


def test_the_costliest_members_start_first():
    class M:  # what member_cost reads of a member
        def __init__(self, layers, steps):
            self.config = tiny_config(f"layers={layers}", **{"train.steps": steps})
    assert sweep.member_cost(M(2, 100)) > sweep.member_cost(M(1, 100))
    assert sweep.member_cost(M(1, 300)) == 3 * sweep.member_cost(M(1, 100))


def _bash(*args, **env):
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "ICL_JAX_PYTHON": sys.executable, **env},
                          timeout=120)


def test_launch_scripts_dry_run(tmp_path):
    for script in ("local.sh", "tpu_pod.sh", "gpu_multihost.sh", "slurm.sh"):
        r = _bash(f"launch/{script}", "--help")
        assert r.returncode == 0 and "Usage: launch/" + script in r.stdout, script

    r = _bash("launch/local.sh", "--dry-run", "train", "--config", "small:layers=2",
              "--workdir", "runs/2l")
    assert r.returncode == 0
    assert r.stdout.strip() == (f"{sys.executable} -m icl_jax train --config "
                                "small:layers=2 --workdir runs/2l")

    r = _bash("launch/tpu_pod.sh", "--dry-run", "--tpu", "pod1", "--zone", "us-central2-b", "--",
              "train", "--config", "paper", "--workdir", "gs://bkt/runs/paper")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("gcloud compute tpus tpu-vm ssh pod1 --zone us-central2-b "
                               "--worker=all --command ")
    assert "ICL_JAX_DISTRIBUTED=1\\ python3\\ -m\\ icl_jax\\ train" in r.stdout
    assert "gs://bkt/runs/paper" in r.stdout

    r = _bash("launch/gpu_multihost.sh", "--dry-run", "train", "--workdir", "/shared/r",
              SLURM_NTASKS="4", SLURM_PROCID="3", ICL_JAX_COORDINATOR="node0:12355")
    assert r.returncode == 0, r.stderr
    assert ("ICL_JAX_COORDINATOR=node0:12355 ICL_JAX_NUM_PROCESSES=4 ICL_JAX_PROCESS_ID=3 "
            f"{sys.executable} -m icl_jax train --workdir /shared/r") in r.stdout

    wd = str(tmp_path / "paper_small")
    r = _bash("launch/slurm.sh", "--dry-run", "--config", "paper_small:smear",
              "--workdir", wd, "--partition", "cpu", "--", "--config.train.steps=100")
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --array=0-1" in r.stdout and "#SBATCH --partition=cpu" in r.stdout
    assert "MEMBERS=(1l-smear 2l-smear)" in r.stdout
    assert (f"-m icl_jax sweep --config paper_small:smear --workdir {wd} "
            '--config.train.steps=100 --members "${MEMBERS[$SLURM_ARRAY_TASK_ID]}"') in r.stdout
    r = _bash("launch/slurm.sh", "--dry-run", "--config", "paper_small:smear",
              "--workdir", wd, "--", "--config.model.context=3")
    assert r.returncode == 2 and "sweep member '1l-smear'" in r.stderr and not r.stdout


def test_a_tiny_sweep_trains_indexes_and_skips(tmp_path, capsys):
    spec = _write_sweep(tmp_path, {"a": {}, "b": {"overrides": {"seed": 1}}}, overrides=TINY)
    wd = str(tmp_path / "runs")
    index = sweep.run_sweep(spec, wd, jobs=2)
    saved = json.load(open(os.path.join(wd, "sweep.json")))
    for name in ("a", "b"):
        entry = saved["members"][name]
        assert entry["status"] == "done", (entry, open(os.path.join(wd, name, "train.log")).read())
        assert entry["exit_code"] == 0 and entry["last_step"] == 4 and entry["wall_s"] > 0
        assert entry["overrides"]["train.steps"] == "4"
        assert os.path.isdir(os.path.join(wd, name, "snapshots", "4"))
    assert saved["members"]["b"]["overrides"]["seed"] == "1"
    assert index["members"]["a"]["status"] == "done"
    capsys.readouterr()

    again = sweep.run_sweep(spec, wd, jobs=2)  # both finished: nothing starts
    err = capsys.readouterr().err
    assert "2 already finished; 0 to train" in err and "started" not in err
    assert again["members"]["a"]["started"] == saved["members"]["a"]["started"]


@pytest.mark.slow
def test_members_of_one_shape_compile_once_per_sweep(tmp_path, monkeypatch):
    """The persistent compilation cache, in one place for every workdir
    ($ICL_JAX_CACHE/jax): a second member that differs only in its seed, in another sweep
    workdir, finds every program the first one compiled (no new cache entry)."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("ICL_JAX_CACHE", str(tmp_path / "cache"))
    cache = str(tmp_path / "cache" / "jax")
    assert sweep.compilation_cache() == cache
    first = _write_sweep(tmp_path, {"a": {}}, overrides=TINY)
    sweep.run_sweep(first, str(tmp_path / "runs"), progress=False)
    after_a = sorted(os.listdir(cache))
    assert after_a  # the train step, init, evaluation: all written
    both = _write_sweep(tmp_path, {"a": {}, "b": {"overrides": {"seed": 1}}}, overrides=TINY)
    index = sweep.run_sweep(both, str(tmp_path / "elsewhere"), progress=False)
    assert index["members"]["b"]["status"] == "done"
    assert sorted(os.listdir(cache)) == after_a
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # '' turns it off
    assert sweep.compilation_cache() is None


def test_an_in_process_sweep_stops_when_its_member_is_stopped(tmp_path, monkeypatch):
    """A SIGTERM reaches the training loop of the member being trained (it saves a snapshot
    and returns early); the sweep must then stop too, not start the next member (reproduce
    trains this way), and the same command resumes."""
    from icl_jax import train
    real = train.train_and_evaluate
    calls = []

    def preempted(config, workdir, **kw):  # as the loop returns after a SIGTERM at step 2
        calls.append(workdir)
        return real(config, workdir, **kw, stop_after=2)

    monkeypatch.setattr(train, "train_and_evaluate", preempted)
    spec = _write_sweep(tmp_path, {"a": {}, "b": {"overrides": {"seed": 1}}}, overrides=TINY)
    wd = str(tmp_path / "runs")
    index = sweep.run_sweep(spec, wd, in_process=True, progress=False)
    assert len(calls) == 1  # b never started
    assert index["members"]["a"]["status"] == "pending" and index["members"]["a"]["last_step"] == 2
    assert index["members"]["b"]["status"] == "pending"
    monkeypatch.setattr(train, "train_and_evaluate", real)
    index = sweep.run_sweep(spec, wd, in_process=True, progress=False)
    assert {m["status"] for m in index["members"].values()} == {"done"}


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a reparented child nobody reaps)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_members_stop_when_the_sweep_is_killed_and_a_rerun_finds_the_truth(tmp_path):
    """SIGKILL the sweep while two members train: they get SIGTERM from the kernel (a
    parent-death signal), save a snapshot and exit, instead of training on as orphans; the
    index then says pending, not the "running" the killed sweep left."""
    import signal
    import time
    long = {**TINY, "train.steps": "1000000", "checkpoint.every": "100000"}
    spec = _write_sweep(tmp_path, {"a": {}, "b": {"overrides": {"seed": 1}}}, overrides=long)
    wd = tmp_path / "runs"
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR="")
    parent = subprocess.Popen([sys.executable, "-m", "icl_jax", "sweep", "--config", spec,
                               "--workdir", str(wd), "--jobs", "2", "--quiet"], cwd=ROOT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and parent.poll() is None:
            if all(os.path.exists(wd / n / "metrics.jsonl") and (wd / n / "metrics.jsonl")
                   .read_text().count("\n") >= 3 for n in "ab"):
                break
            time.sleep(0.2)
        index = json.loads((wd / "sweep.json").read_text())
        pids = [index["members"][n]["pid"] for n in "ab"]
        assert parent.poll() is None and all(map(_alive, pids)), index
        members = sweep.resolve(spec, str(wd), overrides=long)
        now = sweep.Index(str(wd), spec, members).data["members"]  # while they train
        assert [now[n]["status"] for n in "ab"] == ["running"] * 2
        assert [now[n]["pid"] for n in "ab"] == pids
        parent.kill()
        parent.wait()
        deadline = time.time() + 120
        while time.time() < deadline and any(map(_alive, pids)):
            time.sleep(0.2)
        assert not any(map(_alive, pids)), "members outlived their sweep"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert json.loads((wd / "sweep.json").read_text())["members"]["a"]["status"] == "running"
    after = sweep.Index(str(wd), spec, members).data["members"]
    assert [after[n]["status"] for n in "ab"] == ["pending"] * 2
    for n in "ab":  # each saved where the SIGTERM found it
        assert "received SIGTERM" in (wd / n / "train.log").read_text()
        assert after[n]["last_step"] and after[n]["last_step"] > 0
