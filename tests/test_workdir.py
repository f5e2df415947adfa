"""workdir.py, the layout of a run's folder: jax-free, config.json, metrics.jsonl, snapshot
folders, the lock."""
import json
import os
import subprocess
import sys

import pytest

from icl_jax import workdir
from conftest import ROOT, tiny_config


def test_importing_workdir_does_not_import_jax():
    code = "import sys, icl_jax.workdir; print('jax' in sys.modules, 'flax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_config_is_written_read_and_compared(tmp_path):
    w = str(tmp_path / "run")
    assert not workdir.has_run(w)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        workdir.read_config_dict(w)
    cfg = tiny_config()
    workdir.write_config(w, cfg.to_json())
    assert workdir.has_run(w) and workdir.read_config_dict(w) == json.loads(cfg.to_json())
    other = json.loads(tiny_config(**{"train.lr": 3e-3, "seed": 4}).to_json())
    assert workdir.config_diff(workdir.read_config_dict(w), other) == [
        "seed: 0 -> 4", f"train.lr: {cfg.train.lr!r} -> 0.003"]
    assert workdir.config_diff(other, other) == []


def _write_lines(w, lines):
    os.makedirs(w, exist_ok=True)
    workdir.metrics_path(w).write_text("".join(lines))


def test_metrics_are_trimmed_on_resume_and_a_cut_off_last_line_is_ignored(tmp_path):
    w = str(tmp_path)
    _write_lines(w, [json.dumps({"step": s}) + "\n" for s in (0, 2, 4, 6)] + ['{"step": 8, "tr'])
    assert [r["step"] for r in workdir.read_metrics(w)] == [0, 2, 4, 6]
    assert workdir.last_metrics_step(w) == 6
    log = workdir.MetricsLog(w, resume_step=4)  # the snapshot a resume starts from
    log.write({"step": 5})
    log.close()
    assert [r["step"] for r in workdir.read_metrics(w)] == [0, 2, 4, 5]
    _write_lines(w, ['{"step": 0}\n', '{"ste\n', '{"step": 2}\n'])
    # damage before the end is not a crash's cut: named, with its line
    with pytest.raises(workdir.WorkdirError, match=r"metrics.jsonl: line 2 is not a metrics"):
        workdir.read_metrics(w)
    assert workdir.read_metrics(str(tmp_path / "none")) == []


def test_snapshot_steps_come_from_finished_folder_names(tmp_path):
    w = str(tmp_path)
    assert workdir.snapshot_steps(w) == [] and workdir.newest_snapshot(w) is None
    for name in ("0", "10", "2", "20.orbax-checkpoint-tmp-17"):  # the last: a save in flight
        (workdir.snapshots_dir(w) / name).mkdir(parents=True)
    assert workdir.snapshot_steps(w) == [0, 2, 10] and workdir.newest_snapshot(w) == 10


def test_is_finished_needs_the_last_step_and_the_same_config(tmp_path):
    w, cfg = str(tmp_path), tiny_config()
    workdir.write_config(w, cfg.to_json())
    (workdir.snapshots_dir(w) / "4").mkdir(parents=True)
    assert not workdir.is_finished(w, cfg)
    (workdir.snapshots_dir(w) / str(cfg.train.steps)).mkdir()
    assert workdir.is_finished(w, cfg)
    assert not workdir.is_finished(w, tiny_config(**{"train.lr": 3e-3}))
    # how a run is measured is not which run it is (config.MEASUREMENT)
    assert workdir.is_finished(w, tiny_config(**{"eval.n_examples": 1024, "llc.chains": 2}))


def test_a_run_resumes_under_other_eval_values_and_keeps_them(tmp_path):
    from icl_jax import train
    w, cfg = str(tmp_path), tiny_config()
    train.prepare_workdir(cfg, w, overwrite=False)
    (workdir.snapshots_dir(w) / "4").mkdir(parents=True)  # a run there now
    more = tiny_config(**{"eval.n_examples": 96})
    train.prepare_workdir(more, w, overwrite=False)
    assert workdir.read_config_dict(w)["eval"]["n_examples"] == 96
    with pytest.raises(train.TrainingError, match="different config.*d_model"):
        train.prepare_workdir(tiny_config(**{"model.d_model": 48, "eval.n_examples": 8}), w,
                              overwrite=False)


def test_clear_run_removes_snapshots_and_metrics(tmp_path):
    w = str(tmp_path)
    workdir.write_config(w, tiny_config().to_json())
    (workdir.snapshots_dir(w) / "0").mkdir(parents=True)
    _write_lines(w, ['{"step": 0}\n'])
    workdir.clear_run(w)
    assert workdir.snapshot_steps(w) == [] and workdir.read_metrics(w) == []
    assert workdir.has_run(w)


def test_the_lock_refuses_a_second_holder(tmp_path):
    first = workdir.Lock(str(tmp_path))
    try:
        with pytest.raises(BlockingIOError, match=f"pid {os.getpid()}"):
            workdir.Lock(str(tmp_path))
    finally:
        first.release()
    workdir.Lock(str(tmp_path)).release()  # free again once released


def test_a_file_is_not_a_usable_workdir(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(workdir.WorkdirError, match="is a file, not a folder"):
        workdir.check_usable(str(f))
    workdir.check_usable(str(tmp_path / "new"))  # a folder yet to be made is fine
