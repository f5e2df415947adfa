"""gs:// workdirs against a local GCS emulator (gcp-storage-emulator, started here).

etils.epath reaches gs:// through fsspec's gcsfs (tensorflow is not installed), which
honours STORAGE_EMULATOR_HOST; orbax's tensorstore honours TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING. So the same code paths as on a real bucket are exercised.

The emulator ignores GCS's create-if-absent precondition (ifGenerationMatch=0, answered
with 412 by GCS), on which the lock rests; the fixture adds exactly that rule to it.
"""
import json
from http import HTTPStatus
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# read when gcsfs is imported: no zonal-bucket lookup through the real control plane
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

from conftest import ROOT  # noqa: E402
from icl_jax import workdir  # noqa: E402

BUCKET = "test-bucket"


def _honour_if_absent(insert):
    """GCS refuses an upload whose ifGenerationMatch is not the object's generation (412;
    0 means the object must not exist)."""
    from gcp_storage_emulator.exceptions import NotFound

    def wrapped(request, response, storage, *args, **kwargs):
        want = (request.query.get("ifGenerationMatch") or [None])[0]
        if want is not None and "upload_id" not in request.query:
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):  # multipart or resumable
                name = (request.data.get("meta") or request.data).get("name")
            try:
                current = storage.get_file_obj(request.params["bucket_name"], name)["generation"]
            except NotFound:
                current = "0"
            if str(current) != str(want):  # tensorstore's OCDBT manifest relies on this too
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return insert(request, response, storage, *args, **kwargs)
    return wrapped


def _with_generation_header(download):
    """GCS answers a media download with the object's generation in x-goog-generation;
    tensorstore (OCDBT's manifest) reads it, the emulator leaves it out."""
    from gcp_storage_emulator.exceptions import NotFound

    def wrapped(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        except NotFound:
            pass
        return download(request, response, storage, *args, **kwargs)
    return wrapped


@pytest.fixture(scope="module")
def gcs():
    """A running emulator holding BUCKET; the environment points gcsfs and tensorstore at it."""
    from gcp_storage_emulator import server as srv
    from gcp_storage_emulator.handlers import objects
    originals = {"insert": objects.insert, "download": objects.download}
    patches = {"insert": _honour_if_absent(objects.insert),
               "download": _with_generation_header(objects.download)}

    def swap(old, new):
        for name in old:
            setattr(objects, name, new[name])
            for _, handlers in srv.HANDLERS:
                for method, h in list(handlers.items()):
                    if h is old[name]:
                        handlers[method] = new[name]

    swap(originals, patches)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = srv.create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://localhost:{port}",
           "TENSORSTORE_GCS_HTTP_URL": f"http://localhost:{port}",
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()  # an instance made before points at real GCS
    try:
        yield env
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcsfs.GCSFileSystem.clear_instance_cache()
        swap(patches, originals)


_n = iter(range(1000))


@pytest.fixture
def run_url(gcs):
    return f"gs://{BUCKET}/run{next(_n)}"


def test_config_round_trips_through_the_bucket(run_url):
    assert workdir.is_remote(run_url) and not workdir.is_remote("/tmp/x")
    assert not workdir.has_run(run_url)
    workdir.check_usable(run_url)
    text = json.dumps({"model": {"n_layers": 2}, "seed": 0})
    workdir.write_config(run_url, text)
    assert workdir.has_run(run_url)
    assert workdir.read_config_dict(run_url) == json.loads(text)
    workdir.write_config(run_url, json.dumps({"seed": 1}))  # replaced whole, no tmp left
    assert workdir.read_config_dict(run_url) == {"seed": 1}
    assert sorted(p.name for p in workdir.path(run_url).iterdir()) == ["config.json"]


def test_metrics_on_a_bucket_are_rewritten_whole_and_resume_logs_no_step_twice(run_url):
    log = workdir.MetricsLog(run_url, resume_step=0, flush_every_s=3600)
    for step in range(0, 50, 10):
        log.write({"step": step, "loss": float(step)})
    # object storage cannot append: nothing reaches the bucket before a flush
    assert workdir.read_metrics(run_url) == []
    log.flush()  # what train does after a snapshot
    assert [r["step"] for r in workdir.read_metrics(run_url)] == [0, 10, 20, 30, 40]
    log.write({"step": 50, "loss": 50.0})
    log.write({"step": 60, "loss": 60.0})
    # killed here: steps 50 and 60 never reached the bucket; resume from a snapshot at 30
    log = workdir.MetricsLog(run_url, resume_step=30, flush_every_s=3600)
    assert [r["step"] for r in workdir.read_metrics(run_url)] == [0, 10, 20, 30]
    for step in range(40, 70, 10):
        log.write({"step": step, "loss": -float(step)})
    log.close()
    records = workdir.read_metrics(run_url)
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40, 50, 60]
    assert records[4]["loss"] == -40.0  # the resumed run's record, not the lost one
    assert workdir.last_metrics_step(run_url) == 60


def test_local_metrics_are_appended_per_record_and_trimmed_on_resume(tmp_path):
    log = workdir.MetricsLog(tmp_path, resume_step=0)
    for step in (0, 10, 20):
        log.write({"step": step})
    assert [r["step"] for r in workdir.read_metrics(tmp_path)] == [0, 10, 20]  # no flush needed
    log.close()
    log = workdir.MetricsLog(tmp_path, resume_step=10)
    log.write({"step": 20, "resumed": True})
    log.close()
    assert workdir.read_metrics(tmp_path) == [{"step": 0}, {"step": 10},
                                              {"step": 20, "resumed": True}]


def test_metrics_flush_on_their_own_every_flush_every_s(run_url):
    log = workdir.MetricsLog(run_url, resume_step=0, flush_every_s=0.0)
    log.write({"step": 0})
    log.write({"step": 5})
    assert [r["step"] for r in workdir.read_metrics(run_url)] == [0, 5]


def test_lock_on_a_bucket_refuses_a_second_trainer_and_names_the_owner(run_url):
    lock = workdir.Lock(run_url)
    owner = workdir.read_lock(run_url)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert "time" in owner
    with pytest.raises(workdir.WorkdirLocked) as e:
        workdir.Lock(run_url)
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert f"icl-jax unlock --workdir {run_url}" in msg
    lock.release()
    assert workdir.read_lock(run_url) is None
    workdir.Lock(run_url).release()  # free again


def _plant_owner(run_url, **owner):
    (workdir.path(run_url) / workdir.LOCK).write_text(json.dumps(owner))


def test_a_stale_lock_from_another_host_is_kept_until_broken(run_url):
    _plant_owner(run_url, host="tpu-worker-0", pid=4242, time="2026-01-01T00:00:00+00:00")
    with pytest.raises(workdir.WorkdirLocked, match="pid 4242 on host tpu-worker-0"):
        workdir.Lock(run_url)
    assert workdir.break_lock(run_url)["host"] == "tpu-worker-0"
    assert workdir.read_lock(run_url) is None
    lock = workdir.Lock(run_url)
    assert workdir.read_lock(run_url)["pid"] == os.getpid()
    lock.release()


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(run_url):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant_owner(run_url, host=socket.gethostname(), pid=dead.pid, time="then")
    lock = workdir.Lock(run_url)
    assert workdir.read_lock(run_url)["pid"] == os.getpid()
    lock.release()


def test_release_leaves_another_trainers_lock_alone(run_url):
    lock = workdir.Lock(run_url)
    workdir.break_lock(run_url)
    successor = workdir.Lock(run_url)
    lock.release()  # the broken lock's owner exits late
    assert workdir.read_lock(run_url) == successor.owner
    successor.release()


def test_local_lock_records_its_owner_and_frees_with_the_process(tmp_path):
    lock = workdir.Lock(tmp_path)
    owner = workdir.read_lock(tmp_path)
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    with pytest.raises(workdir.WorkdirLocked, match=f"pid {os.getpid()} on host"):
        workdir.Lock(tmp_path)
    lock.release()
    assert workdir.read_lock(tmp_path) is None  # the file stays; no flock, no owner


def test_orbax_snapshots_reach_the_bucket_through_tensorstore(run_url):
    import orbax.checkpoint as ocp
    directory = workdir.snapshots_dir(run_url)
    state = {"W_E": np.arange(12.0, dtype=np.float32).reshape(3, 4), "b_U": np.ones(4, np.float32)}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options) as manager:
        for step in (0, 7):
            manager.save(step, args=ocp.args.StandardSave(state))
    assert workdir.snapshot_steps(run_url) == [0, 7]
    # a save cut short on object storage leaves <step>/ without orbax's commit marker
    (directory / "9" / "default").mkdir(parents=True)
    (directory / "9" / "default" / "_METADATA").write_text("{}")
    assert workdir.snapshot_steps(run_url) == [0, 7]
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False)) as manager:
        restored = manager.restore(7, args=ocp.args.StandardRestore(state))
    np.testing.assert_array_equal(restored["W_E"], state["W_E"])
    workdir.clear_run(run_url)
    assert workdir.snapshot_steps(run_url) == []


def _cli(env, *args, check=True):
    out = subprocess.run([sys.executable, "-m", "icl_jax", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode:
        raise AssertionError(f"icl-jax {' '.join(args)} exited {out.returncode}:\n"
                             f"{out.stderr[-3000:]}")
    return out


@pytest.mark.slow
def test_train_kill_resume_analyze_export_in_a_bucket(gcs, run_url, tmp_path):
    """The whole life of a run in gs://: needs train, checkpoints, analysis and export to
    go through icl_jax.workdir (etils.epath) and orbax only."""
    env = {**os.environ, **gcs, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    train = ["train", "--config", "small:layers=2", "--workdir", run_url,
             "--config.model.d_model=16", "--config.model.context=32",
             "--config.model.vocab_size=32", "--config.eval.n_examples=8",
             "--config.data.segment_len_min=3", "--config.data.segment_len_max=8",
             "--config.eval.icl_early_index=2", "--config.eval.icl_late_index=20",
             "--config.eval.probe_tokens=7", "--config.eval.probe_sequences=2",
             "--config.train.batch_size=8", "--config.train.log_every=2",
             "--config.train.eval_every=10", "--config.checkpoint.every=10",
             "--config.checkpoint.log_spaced=0", "--config.checkpoint.async_save=false",
             "--config.train.steps=200"]
    # a first trainer, killed once it has written a few snapshots
    first = subprocess.Popen([sys.executable, "-m", "icl_jax", *train], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if len(workdir.snapshot_steps(run_url)) >= 3:
            break
        time.sleep(0.2)
    assert first.poll() is None, first.stdout.read()[-3000:]
    # while it runs, a second trainer is refused with its owner's name
    refused = _cli(env, *train, check=False)
    assert refused.returncode != 0 and f"pid {first.pid}" in refused.stderr
    first.kill()  # SIGKILL: no snapshot at exit, the lock object stays behind
    first.wait()
    assert workdir.read_lock(run_url)["pid"] == first.pid
    _cli(env, "unlock", "--workdir", run_url)
    assert workdir.read_lock(run_url) is None
    killed_at = workdir.newest_snapshot(run_url)
    assert 0 < killed_at < 200
    _cli(env, *train)  # resumes from killed_at
    steps = [r["step"] for r in workdir.read_metrics(run_url)]
    assert steps == sorted(set(steps)) and steps[-1] == 200  # no step logged twice
    # and none lost: the records up to the snapshot resumed from were flushed with it
    assert set(workdir.snapshot_steps(run_url)) <= set(steps)
    assert workdir.newest_snapshot(run_url) == 200 and workdir.read_lock(run_url) is None
    out = f"{run_url}/analysis"
    _cli(env, "analyze", "--workdir", run_url, "--out", out)
    scores = json.loads((workdir.path(out) / "scores.json").read_text())
    assert scores["steps"] == workdir.snapshot_steps(run_url)
    npz = tmp_path / "model.npz"
    _cli(env, "export", "--workdir", run_url, "--out", str(npz))
    import icl_jax
    run = icl_jax.Run(run_url)
    assert run.steps[-1] == 200 and run.metrics[-1]["step"] == 200
    np.testing.assert_array_equal(np.load(npz)["W_E"], np.asarray(run.params(200)["W_E"]))
