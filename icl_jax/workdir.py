"""The layout of a workdir, owned here and nowhere else (no jax, so sweeps and tools can read it).

    <workdir>/config.json         the run's config (written once; a resume must match it)
    <workdir>/metrics.jsonl       one JSON record per logged step
    <workdir>/snapshots/<step>/   orbax snapshots (written by checkpoints.Store)
    <workdir>/corrupt_snapshots/  snapshots that failed to restore, moved aside
    <workdir>/.lock               held by the one process that trains into it

Paths are etils.epath paths, so the same code reads a local folder or a bucket.
"""
from __future__ import annotations

import fcntl
import json
import os

from etils import epath

CONFIG, METRICS, SNAPSHOTS, CORRUPT, LOCK = (
    "config.json", "metrics.jsonl", "snapshots", "corrupt_snapshots", ".lock")


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message names it and what to do."""


def path(workdir) -> epath.Path:
    return epath.Path(workdir)


def config_path(workdir) -> epath.Path:
    return path(workdir) / CONFIG


def metrics_path(workdir) -> epath.Path:
    return path(workdir) / METRICS


def snapshots_dir(workdir) -> epath.Path:
    return path(workdir) / SNAPSHOTS


def corrupt_dir(workdir) -> epath.Path:
    return path(workdir) / CORRUPT


def check_usable(workdir):
    """Raises WorkdirError if `workdir` exists and is not a folder."""
    p = path(workdir)
    if p.exists() and not p.is_dir():
        raise WorkdirError(f"--workdir {str(workdir)!r} is a file, not a folder; "
                           "choose another --workdir")


def _write_atomic(p: epath.Path, text: str):
    tmp = p.parent / (p.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(p)  # a reader sees the old file or the new one, never half of one


# ----------------------------------------------------------------------------- config.json

def has_run(workdir) -> bool:
    return config_path(workdir).exists()


def read_config_dict(workdir) -> dict:
    """config.json as written (use config.from_json to get a ConfigDict)."""
    p = config_path(workdir)
    if not p.exists():
        raise FileNotFoundError(f"{str(workdir)!r} holds no run (no {CONFIG}); pass the "
                                "--workdir a training run wrote")
    return json.loads(p.read_text())


def write_config(workdir, text: str):
    path(workdir).mkdir(parents=True, exist_ok=True)
    _write_atomic(config_path(workdir), text)


def config_diff(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """'section.field: old -> new' for every field in which two config dicts differ."""
    out = []
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ----------------------------------------------------------------------------- metrics.jsonl

def read_metrics(workdir) -> list[dict]:
    """metrics.jsonl as a list; a last line cut short by a crash is ignored."""
    p = metrics_path(workdir)
    if not p.exists():
        return []
    lines = [line for line in p.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


def last_metrics_step(workdir):
    """The step of the last complete record of metrics.jsonl, or None."""
    records = read_metrics(workdir)
    return records[-1].get("step") if records else None


class MetricsLog:
    """metrics.jsonl, trimmed on resume to the records up to `resume_step`, so that no step
    is logged twice; then appended to, one flushed line per record."""

    def __init__(self, workdir, resume_step: int):
        kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
        self.path = metrics_path(workdir)
        _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")

    def write(self, record: dict):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def clear_run(workdir):
    """Removes the snapshots and metrics of a run (for --overwrite); config.json is rewritten."""
    s = snapshots_dir(workdir)
    if s.exists():
        s.rmtree()
    m = metrics_path(workdir)
    if m.exists():
        m.unlink()


# ----------------------------------------------------------------------------- snapshots

def snapshot_steps(workdir) -> list[int]:
    """Finished snapshot steps, read from the folder names (orbax renames a save's tmp
    folder to <step> only when it is complete)."""
    s = snapshots_dir(workdir)
    if not s.is_dir():
        return []
    return sorted(int(p.name) for p in s.iterdir() if p.name.isdigit())


def newest_snapshot(workdir):
    steps = snapshot_steps(workdir)
    return steps[-1] if steps else None


def is_finished(workdir, config) -> bool:
    """The newest snapshot is the config's last step, and the workdir holds this config."""
    from icl_jax import config as config_lib  # jax-free
    if newest_snapshot(workdir) != config.train.steps:
        return False
    try:
        saved = config_lib.upgrade(read_config_dict(workdir))
    except (OSError, ValueError):
        return False
    return saved == json.loads(config.to_json())


# ----------------------------------------------------------------------------- the lock

class Lock:
    """An exclusive lock on a workdir, so two train processes never write to one run."""

    def __init__(self, workdir):
        check_usable(workdir)
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, LOCK)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise BlockingIOError(f"workdir {workdir!r} is being written by another train "
                                  f"process (pid {holder}); wait for it or stop it") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
