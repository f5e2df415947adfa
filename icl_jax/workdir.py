"""The layout of a workdir, owned here and nowhere else (no jax, so sweeps and tools can read it).

    <workdir>/config.json         the run's config (written once; a resume must match it)
    <workdir>/metrics.jsonl       one JSON record per logged step
    <workdir>/snapshots/<step>/   orbax snapshots (written by checkpoints.Store)
    <workdir>/corrupt_snapshots/  snapshots that failed to restore, moved aside
    <workdir>/history.jsonl       what happened to the run besides training: a divergence, a
                                  stated continuation (more steps, a divergence's advice taken),
                                  config.json written again from a snapshot's copy
    <workdir>/orbax.log           orbax's own log (its tracebacks), kept out of the terminal
    <workdir>/.lock               held by the one process that trains into it

A run's identity is the config saved with its snapshots (each holds the config that made
it); config.json is the copy that tools read, checked against the newest snapshot's on
every resume.

Paths are etils.epath paths, so the same code reads a local folder or a bucket
(gs://, through gcsfs). Object storage has no rename, no append and no flock, so three
things differ there, each behind the same interface:
  - a whole-file write is one upload (an object appears whole or not at all), with no
    tmp file and rename (_write_atomic);
  - metrics.jsonl is kept in memory by the one writer and the object rewritten whole
    (MetricsLog.flush: at every snapshot, at close, and at most every `flush_every_s`);
  - the lock is an owner record (host, pid, time) created only if absent (GCS's
    ifGenerationMatch=0); a second trainer is refused with the owner's name, and a lock
    left by a killed process is broken with break_lock (`icl-jax unlock --workdir`).
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time

from etils import epath

CONFIG, METRICS, SNAPSHOTS, CORRUPT, LOCK, HISTORY, ORBAX_LOG = (
    "config.json", "metrics.jsonl", "snapshots", "corrupt_snapshots", ".lock", "history.jsonl",
    "orbax.log")


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message names it and what to do."""


def path(workdir) -> epath.Path:
    return epath.Path(workdir)


def is_remote(workdir) -> bool:
    """True for object storage (gs://...), where there is no rename, append or flock."""
    return "://" in os.fspath(workdir)


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
    """A reader sees the old file or the new one, never half of one."""
    if is_remote(p):
        p.write_text(text)  # one upload: the object is replaced whole when it completes
        return
    tmp = p.parent / (p.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(p)


def absolute(workdir) -> str:
    """The workdir as an absolute path or URL (a bucket's already is)."""
    return os.fspath(path(workdir) if is_remote(workdir) else path(workdir).absolute())


def write_text(p, text: str):
    """Writes a whole output file (scores, figures' page, results), its folder made first."""
    p = epath.Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(p, text)


def write_bytes(p, data: bytes):
    p = epath.Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


# ----------------------------------------------------------------------------- config.json

def has_run(workdir) -> bool:
    return config_path(workdir).exists()


def read_json(p, what: str = "") -> dict:
    """A JSON object from the file `p`; WorkdirError naming the file when it cannot be read
    as one (cut short, edited by hand), FileNotFoundError when it is missing."""
    p = epath.Path(p)
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise WorkdirError(f"{os.fspath(p)}: not a text file{what}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkdirError(f"{os.fspath(p)}: not valid JSON ({e.msg} at line {e.lineno}, "
                           f"column {e.colno}){what}") from None
    if not isinstance(value, dict):
        raise WorkdirError(f"{os.fspath(p)}: holds a JSON {type(value).__name__}, not an "
                           f"object{what}")
    return value


def read_config_dict(workdir) -> dict:
    """config.json as written (use config.from_json to get a ConfigDict)."""
    p = config_path(workdir)
    if not p.exists():
        raise FileNotFoundError(f"{str(workdir)!r} holds no run (no {CONFIG}); pass the "
                                "--workdir a training run wrote")
    return read_json(p, "; put it back, or delete it: `icl-jax train --workdir` writes it "
                        "again from the newest snapshot's copy")


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

def _metrics_lines(workdir) -> list[tuple[int, dict | None]]:
    """(line number, record or None where the line is not a record) of metrics.jsonl."""
    p = metrics_path(workdir)
    if not p.exists():
        return []
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        text = p.read_bytes().decode(errors="replace")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
            record = None
        out.append((n, record))
    return out


def _damaged_line(workdir, n: int) -> WorkdirError:
    return WorkdirError(f"{os.fspath(metrics_path(workdir))}: line {n} is not a metrics record "
                        "(a JSON object with a step); mend or delete that line")


def read_metrics(workdir) -> list[dict]:
    """metrics.jsonl as a list; a last line cut short by a crash is ignored, a damaged line
    before it is a WorkdirError naming the line."""
    lines = _metrics_lines(workdir)
    for i, (n, record) in enumerate(lines):
        if record is None and i != len(lines) - 1:
            raise _damaged_line(workdir, n)
    return [r for _, r in lines if r is not None]


def last_metrics_step(workdir):
    """The step of the last complete record of metrics.jsonl, or None."""
    records = read_metrics(workdir)
    return records[-1].get("step") if records else None


class MetricsLog:
    """metrics.jsonl, trimmed on resume to the records up to `resume_step`, so that no step
    is logged twice; then one record per write.

    Local: appended to, one flushed line per record. Object storage cannot append, so the
    records are kept here and the object is rewritten whole by flush(): call it after each
    snapshot (then every record a resume keeps is stored), and it also runs at close()
    and, from write(), at most every `flush_every_s` seconds so that the run can be
    followed. A crash loses at most the records after the last flush, which are all
    after the last snapshot flushed with them, and a resume logs those steps again.
    """

    def __init__(self, workdir, resume_step: int, flush_every_s: float = 30.0):
        lines = _metrics_lines(workdir)
        # records are in step order: a damaged line among those trimmed away costs nothing
        # (a crash's cut, or damage the resume rewrites); one among those kept is named
        last_kept = max((i for i, (_, r) in enumerate(lines)
                         if r is not None and r["step"] <= resume_step), default=-1)
        bad = [n for n, r in lines[:last_kept + 1] if r is None]
        if bad:
            raise _damaged_line(workdir, bad[0])
        kept = [r for _, r in lines[:last_kept + 1] if r["step"] <= resume_step]
        self.path = metrics_path(workdir)
        self.remote = is_remote(workdir)
        self.flush_every_s = flush_every_s
        self.records = kept
        _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._flushed = time.monotonic()
        self.file = None if self.remote else self.path.open("a")

    def write(self, record: dict):
        if self.remote:
            self.records.append(record)
            if time.monotonic() - self._flushed >= self.flush_every_s:
                self.flush()
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def flush(self):
        """Stores every record written so far (object storage: one upload of the whole log)."""
        if self.remote:
            _write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
            self._flushed = time.monotonic()
        elif self.file is not None:
            self.file.flush()

    def close(self):
        if self.remote:
            self.flush()
        elif self.file is not None:
            self.file.close()
            self.file = None


def clear_run(workdir):
    """Removes the snapshots, metrics and history of a run (for --overwrite); config.json is
    rewritten."""
    s = snapshots_dir(workdir)
    if s.exists():
        s.rmtree()
    for name in (METRICS, HISTORY):
        m = path(workdir) / name
        if m.exists():
            m.unlink()


# ----------------------------------------------------------------------------- history.jsonl

def read_history(workdir) -> list[dict]:
    """history.jsonl's events, oldest first; lines that are not events are skipped (the
    history explains a run, nothing restores from it)."""
    p = path(workdir) / HISTORY
    if not p.exists():
        return []
    events = []
    for line in p.read_bytes().decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events


def add_event(workdir, event: str, **fields):
    """Appends {"event", "time", **fields} to history.jsonl (rewritten whole, so the same on
    object storage, and small)."""
    record = {"event": event, **fields,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    p = path(workdir) / HISTORY
    old = p.read_bytes().decode(errors="replace") if p.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    _write_atomic(p, old + json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- snapshots

def snapshot_steps(workdir) -> list[int]:
    """Finished snapshot steps, read from the folder names (locally orbax renames a save's
    tmp folder to <step> only when it is complete)."""
    s = snapshots_dir(workdir)
    if not s.is_dir():
        return []
    if is_remote(workdir):
        # on object storage orbax writes <step>/ in place and marks it finished last with
        # commit_success.txt (there is no rename); one listing finds them all
        return sorted(int(p.parent.name) for p in s.glob("*/commit_success.txt")
                      if p.parent.name.isdigit())
    return sorted(int(p.name) for p in s.iterdir() if p.name.isdigit())


def newest_snapshot(workdir):
    steps = snapshot_steps(workdir)
    return steps[-1] if steps else None


def is_finished(workdir, config) -> bool:
    """The newest snapshot is the config's last step, and the workdir holds this config's
    run (its measurement sections aside)."""
    from icl_jax import config as config_lib  # jax-free
    if newest_snapshot(workdir) != config.train.steps:
        return False
    try:
        saved = config_lib.upgrade(read_config_dict(workdir))
    except (OSError, ValueError):
        return False
    # the run is finished whatever it is measured with (config.MEASUREMENT)
    return config_lib.run_identity(saved) == config_lib.run_identity(json.loads(config.to_json()))


# ----------------------------------------------------------------------------- the lock

def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "token": f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"}


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "owner unknown"
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, "
            f"since {owner.get('time', '?')}")


def _parse_owner(text: str) -> dict | None:
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        # locks written before owner records held only the pid
        return {"pid": text.strip()} if text.strip() else None
    return owner if isinstance(owner, dict) else None


def _object_fs(p):
    """(fsspec filesystem, path) of an object-storage path; gs:// only, the one whose
    create-if-absent precondition is known."""
    import fsspec  # etils' own gs:// backend; gcsfs must be installed
    url = os.fspath(p)
    if not url.startswith("gs://"):
        raise WorkdirError(f"--workdir {url!r}: training into {url.split('://')[0]}:// is not "
                           "supported (no exclusive create); use gs:// or a local path")
    return fsspec.core.url_to_fs(url)


class WorkdirLocked(BlockingIOError):
    """Another train process holds the workdir; the message names it."""


def read_lock(workdir) -> dict | None:
    """The owner record of a workdir's lock ({host, pid, time}), or None if unlocked."""
    p = path(workdir) / LOCK
    if not p.exists():
        return None
    owner = _parse_owner(p.read_text())
    if not is_remote(workdir):
        # a local lock file outlives its process; only a held flock means locked
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            return owner or {}
        finally:
            os.close(fd)
    return owner or {}


def break_lock(workdir) -> dict | None:
    """Removes a lock left behind by a process that is gone (object storage keeps the owner
    record of a killed trainer; a local flock is released by the kernel). Returns the
    removed owner record, or None if there was none. Only for a trainer known to be dead:
    a live one would go on writing beside the next."""
    owner = read_lock(workdir)
    p = path(workdir) / LOCK
    if is_remote(workdir) and p.exists():
        p.unlink()
    return owner


class Lock:
    """An exclusive lock on a workdir, so two train processes never write to one run.

    Taken by process 0 only. Local: flock on <workdir>/.lock, released by the kernel
    when the process dies. Object storage: the owner record created only if absent; a
    killed process leaves it behind, and a later trainer on the same host takes it over
    when that pid is gone; otherwise break_lock (`icl-jax unlock --workdir`) removes it.
    """

    def __init__(self, workdir):
        check_usable(workdir)
        self.workdir = workdir
        self.path = path(workdir) / LOCK
        self.owner = _owner_record()
        self.fd = None
        if is_remote(workdir):
            self._acquire_object()
        else:
            self._acquire_flock()

    def _refuse(self, owner):
        hint = ("" if not is_remote(self.workdir) else
                f"; if it is gone, `icl-jax unlock --workdir {os.fspath(self.workdir)}` "
                "breaks the lock")
        raise WorkdirLocked(f"workdir {os.fspath(self.workdir)!r} is being written by another "
                            f"train process ({describe_owner(owner)}); wait for it or stop it{hint}")

    def _acquire_flock(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _parse_owner(os.pread(self.fd, 4096, 0).decode(errors="replace"))
            os.close(self.fd)
            self.fd = None
            self._refuse(owner)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.owner).encode(), 0)

    def _acquire_object(self):
        fs, key = _object_fs(self.path)
        for _ in range(2):
            try:
                fs.pipe_file(key, json.dumps(self.owner).encode(), mode="create")
                return
            except FileExistsError:
                owner = self._existing_owner(fs, key)
                if owner is not None and not self.owner_is_dead_here(owner):
                    self._refuse(owner)
                fs.rm_file(key)  # its process is gone (or it vanished): try once more
        self._refuse(self._existing_owner(fs, key))

    @staticmethod
    def _existing_owner(fs, key):
        try:
            return _parse_owner(fs.cat_file(key).decode(errors="replace")) or {}
        except FileNotFoundError:
            return None

    @staticmethod
    def owner_is_dead_here(owner) -> bool:
        """The owner ran on this host and its pid is gone: the lock is stale for certain."""
        if owner.get("host") != socket.gethostname():
            return False
        try:
            os.kill(int(owner.get("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError):
            return False
        return False

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        elif self.owner is not None and is_remote(self.workdir):
            fs, key = _object_fs(self.path)
            # delete only our own record: after a break_lock another trainer may hold it
            if self._existing_owner(fs, key) == self.owner:
                fs.rm_file(key)
        self.owner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
