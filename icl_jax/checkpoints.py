"""Snapshots: the schedule, the orbax store, and Run, the one reader of a trained run.

Where a snapshot lives is workdir.py's business; each snapshot carries the train
state and the config that made it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp

from icl_jax import workdir as workdir_lib


def save_schedule(total_steps: int, every: int, log_spaced: int) -> list[int]:
    """Step 0, `log_spaced` log-spaced steps below `every`, every `every` steps, and the last."""
    steps = {0, total_steps}
    steps.update(range(every, total_steps + 1, every))
    if log_spaced:
        early = np.geomspace(1, min(every, total_steps), log_spaced + 1)
        steps.update(int(round(s)) for s in early)
    return sorted(s for s in steps if 0 <= s <= total_steps)


class SnapshotError(RuntimeError):
    """A snapshot that cannot be read. damaged: its files are wrong (cut short, missing, a
    flipped bit), so it is moved aside and its steps trained again; otherwise (permissions,
    a transient I/O error) nothing is moved and the message says what to fix."""

    def __init__(self, message: str, damaged: bool):
        super().__init__(message)
        self.damaged = damaged


# errors that say nothing about a snapshot's files: a restore failing with one of them stops
# with a message and moves nothing (orbax and tensorstore raise many kinds, often wrapped)
_NOT_DAMAGE_ERRNO = {errno.EACCES, errno.EPERM, errno.EIO, errno.ENOSPC, errno.ENOMEM,
                     errno.EAGAIN, errno.ETIMEDOUT, errno.EMFILE, errno.ENFILE, errno.EROFS}
_NOT_DAMAGE_TEXT = ("PERMISSION_DENIED", "Permission denied", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "Too many open files",
                    "Input/output error", "CANCELLED")


def is_damage(err: BaseException) -> bool:
    """Whether a failed restore means the snapshot's files are damaged (anything but a
    permission, resource or transient I/O error, in `err` or what it wraps)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (PermissionError, TimeoutError, ConnectionError, MemoryError)):
            return False
        if isinstance(err, OSError) and err.errno in _NOT_DAMAGE_ERRNO:
            return False
        if any(t in str(err) for t in _NOT_DAMAGE_TEXT):
            return False
        err = err.__cause__ or err.__context__
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def state_digest(tree) -> dict[str, str]:
    """{array path: sha256 of its dtype, shape and bytes (16 hex digits)} of a tree of
    arrays: what a snapshot's digest item holds, written with it and checked when it is
    read, since orbax keeps no checksums (a flipped bit would restore silently)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        out[jax.tree_util.keystr(path)] = h.hexdigest()[:16]
    return out


_ORBAX_LOG = {}  # what _orbax_log_to has set up in this process


def _orbax_log_to(workdir, writable: bool):
    """Orbax (through absl) logs each failed read with a long traceback and every save:
    none of it reaches the terminal, where this package's one-line messages say what
    happened; the first trainer's local workdir in a process keeps it in orbax.log."""
    log = logging.getLogger("absl")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    if "hook" not in _ORBAX_LOG:
        _ORBAX_LOG["hook"] = sys.unraisablehook = _orbax_unraisable_to_log(sys.unraisablehook)
        logging.getLogger("asyncio").addFilter(_orbax_tasks_to_log)
    if writable and "file" not in _ORBAX_LOG and not workdir_lib.is_remote(workdir):
        p = workdir_lib.path(workdir)
        p.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(p / workdir_lib.ORBAX_LOG, delay=True)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        _ORBAX_LOG["file"] = handler


def _orbax_unraisable_to_log(previous):
    """After a failed read, tensorstore's pending callbacks reach an event loop orbax has
    closed, and Python prints a traceback for each (dozens per damaged snapshot): those go
    to orbax's log; anything else to `previous`."""
    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if frames and os.sep + "asyncio" + os.sep in frames[-1].filename:
            logging.getLogger("absl").error("after a failed read: %s", "".join(
                traceback.format_exception(unraisable.exc_type, unraisable.exc_value,
                                           unraisable.exc_traceback)).strip())
            return
        previous(unraisable)
    return hook


def _orbax_tasks_to_log(record: logging.LogRecord) -> bool:
    """When the garbage collector meets one of orbax's read tasks that failed on a damaged
    snapshot, asyncio logs "Task exception was never retrieved" with its traceback: that
    goes to orbax's log too; asyncio's other messages pass."""
    text = record.getMessage()
    if "never retrieved" in text and "orbax" in text:
        logging.getLogger("absl").error("after a failed read: %s", text,
                                        exc_info=record.exc_info)
        return False
    return True


class Store:
    """The orbax CheckpointManager of one workdir; async saves, every snapshot kept by default.

    A snapshot holds three items: the train state, the config that made it, and the
    digest of the state's arrays (state_digest), compared whenever it is restored."""

    def __init__(self, workdir, max_to_keep: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.workdir = workdir
        # orbax wants an absolute path (a bucket's already is)
        self.directory = workdir_lib.snapshots_dir(workdir_lib.absolute(workdir))
        # orbax logs read-only mode and every save at WARNING/INFO through absl: noise here
        logging.getLogger("absl").setLevel(logging.ERROR)
        _orbax_log_to(workdir, not read_only)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep or None,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            # a kill mid-save leaves a tmp folder that must not be mistaken for a snapshot
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config", "digest"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, config_dict: dict, force: bool = False):
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict),
            digest=ocp.args.JsonSave(state_digest(state))), force=force)

    def _check_readable(self, step: int):
        """Locally, every file of the snapshot opens: a permission problem is named here,
        before orbax turns it into something that looks like damage."""
        if workdir_lib.is_remote(self.workdir):
            return
        folder = os.fspath(self.directory / str(step))
        def refuse(path, err):
            raise SnapshotError(f"snapshot {step} of {str(self.workdir)!r} could not be "
                                f"restored: {path}: {err.strerror or err}; fix that and run "
                                "again (nothing was moved)", damaged=False)
        for root, _, files in os.walk(folder, onerror=lambda e: refuse(e.filename, e)):
            for name in files:
                path = os.path.join(root, name)
                try:
                    os.close(os.open(path, os.O_RDONLY))
                except FileNotFoundError:
                    continue  # damage: orbax says which
                except OSError as e:
                    refuse(path, e)

    def _restore(self, step: int, state_args):
        """The state item of snapshot `step`, its arrays compared with its digest."""
        self._check_readable(step)
        has_digest = (self.directory / str(step) / "digest").exists()
        items = {"state": state_args}
        if has_digest:  # snapshots saved before digests were written have none
            items["digest"] = ocp.args.JsonRestore()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many kinds for damaged files
            damaged = is_damage(e)
            raise SnapshotError(
                f"snapshot {step} of {str(self.workdir)!r} could not be restored: " + (
                    f"it is damaged ({_first_line(e)})" if damaged else
                    f"{_first_line(e)}; fix that and run again (nothing was moved)"),
                damaged=damaged) from None
        if has_digest:
            got = state_digest(out["state"])
            bad = [k for k, v in got.items() if out["digest"].get(k, v) != v]
            if bad:
                raise SnapshotError(f"snapshot {step} of {str(self.workdir)!r} could not be "
                                    f"restored: it is damaged ({bad[0]} differs from the "
                                    "digest saved with it)",
                                    damaged=True)
        return out["state"]

    def restore(self, step: int, abstract_state):
        """The train state of snapshot `step`; SnapshotError if it cannot be restored."""
        return self._restore(step, ocp.args.StandardRestore(abstract_state))

    def saved_config(self, step: int) -> dict:
        """The config saved with snapshot `step` (a dict, as written)."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                config=ocp.args.JsonRestore()))
        except Exception as e:
            raise SnapshotError(f"snapshot {step} of {str(self.workdir)!r}: its config cannot "
                                f"be read ({_first_line(e)})", damaged=is_damage(e)) from None
        return out["config"]

    def saved_digest(self, step: int) -> dict | None:
        """The digest saved with snapshot `step` ({array path: hash}), None for a snapshot
        saved before digests were written or whose digest cannot be read."""
        if not (self.directory / str(step) / "digest").exists():
            return None
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                digest=ocp.args.JsonRestore()))["digest"]
        except Exception:  # a damaged digest: the restore itself will say so
            return None

    def quarantine(self, step: int) -> str:
        """Moves snapshot `step` into the workdir's corrupt folder (never overwriting one)."""
        dst_dir = workdir_lib.corrupt_dir(self.workdir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst, n = dst_dir / str(step), 1
        while dst.exists():
            dst, n = dst_dir / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(dst)
        self.manager.reload()
        return str(dst)

    def remove(self, step: int):
        """Deletes snapshot `step` (one an ensemble member saved beyond the step every
        member resumes from: it is trained again, bit for bit)."""
        self.manager.delete(step)
        self.manager.reload()

    def restore_params(self, step: int, abstract_params):
        """Only the params of a snapshot (no optimizer state), e.g. for scoring; their
        digest is checked."""
        return self._restore(step, ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      {"params": abstract_params}),
            partial_restore=True))["params"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def newest_restorable(stores, abstract_state, say=print):
    """(step, [state per store]) at the newest step that every store holds and restores.

    Damaged snapshots newer than that step are then moved to workdir.corrupt_dir, never
    overwritten (none is moved unless some step restores: a failure of every snapshot
    says more about the reader than the files); snapshots of some stores beyond it
    (ensemble members killed between their saves) are deleted, to be trained again.
    SnapshotError when a snapshot cannot be read for another reason than damage (nothing
    moved), or when no step restores.
    """
    failed = {}  # (store index, step) -> SnapshotError
    while True:
        common = set.intersection(*({s for s in store.steps() if (i, s) not in failed}
                                    for i, store in enumerate(stores)))
        if not common:
            break
        step, states = max(common), []
        for i, store in enumerate(stores):
            try:
                states.append(store.restore(step, abstract_state))
            except SnapshotError as e:
                if not e.damaged:
                    raise
                failed[i, step] = e
                break
        if len(states) < len(stores):
            continue
        for (i, bad), e in sorted(failed.items(), key=lambda kv: -kv[0][1]):
            say(f"warning: {e}; moved to {stores[i].quarantine(bad)}")
        for store in stores:
            ahead = [s for s in store.steps() if s > step]
            for s in ahead:
                store.remove(s)
            if ahead:
                say(f"warning: {str(store.workdir)!r} had snapshot(s) {ahead} beyond step {step}, "
                    "the newest every ensemble member holds; removed, to be trained again")
        return step, states
    if failed:
        (i, step), e = max(failed.items(), key=lambda kv: kv[0][1])
        raise SnapshotError(f"no snapshot of {str(stores[i].workdir)!r} could be restored; "
                            f"the newest: {e}", damaged=False)
    raise SnapshotError(f"ensemble members hold no snapshot at a step in common (newest: "
                        f"{[s.latest() for s in stores]}); resume them one by one: "
                        f"{', '.join(str(s.workdir) for s in stores)}", damaged=False)


# ----------------------------------------------------------------------------- Run



class Run:
    """A trained run, for notebooks and the analysis: its config, model, snapshot steps and
    metrics; params(step) restores one snapshot's params, forward(tokens, step) runs it.

        run = Run("runs/2l"); logits_BTV, attention_BLHTS = run.forward(tokens, step=None)

    The last restored snapshot is kept, so repeated calls on one step restore it once, while
    a pass over every snapshot holds one at a time.
    """

    def __init__(self, workdir):
        from icl_jax import config as config_lib
        from icl_jax.model import init_params, make_model

        self.workdir = workdir
        steps = workdir_lib.snapshot_steps(workdir)
        if workdir_lib.has_run(workdir) or not steps:
            # FileNotFoundError naming the workdir when it holds no run or no snapshot
            self.config = config_lib.from_saved(workdir_lib.read_config_dict(workdir),
                                                os.fspath(workdir_lib.config_path(workdir)))
        if not steps:
            raise FileNotFoundError(f"{str(workdir)!r} has no snapshots yet")
        self._store = Store(workdir, read_only=True)
        if not workdir_lib.has_run(workdir):  # the snapshots are the run: read their copy
            self.config = config_lib.from_saved(self._store.saved_config(steps[-1]),
                                                f"the config saved with snapshot {steps[-1]}")
            print(f"warning: {str(workdir)!r} has no {workdir_lib.CONFIG}; read the config "
                  f"saved with snapshot {steps[-1]}", file=sys.stderr)
        self.model = make_model(self.config.model)
        self.abstract_params = jax.eval_shape(lambda: init_params(self.model, jax.random.key(0)))
        self._last = (None, None)  # (step, params)
        self._forward = jax.jit(lambda p, t: self.model.apply({"params": p}, t))

    @property
    def steps(self) -> list[int]:
        return workdir_lib.snapshot_steps(self.workdir)

    @property
    def metrics(self) -> list[dict]:
        return workdir_lib.read_metrics(self.workdir)

    def params(self, step: int | None = None):
        """The params of snapshot `step` (default: the newest), as numpy arrays."""
        steps = self.steps
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{str(self.workdir)!r} has no snapshot at step {step}; saved "
                                    f"steps: {steps[0]}..{steps[-1]} ({len(steps)} in all)")
        if self._last[0] != step:
            self._last = (None, None)  # let the previous snapshot go before the next arrives
            if step not in self._store.steps():  # saved since the store was opened
                self._store.manager.reload()
            self._last = (step, self._store.restore_params(step, self.abstract_params))
        return self._last[1]

    def snapshot_id(self, step: int) -> str | None:
        """What snapshot `step` holds, in 16 hex digits (from the digest saved with it): a
        snapshot saved again with other contents has another id. None for a snapshot
        saved before digests were written."""
        if step not in self._store.steps():
            self._store.manager.reload()
        digest = self._store.saved_digest(step)
        if digest is None:
            return None
        return hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest()[:16]

    def forward(self, tokens, step: int | None = None):
        """Numpy (logits [B, T, V], attention [B, L, H, T, S]) of `tokens` [B, T] or [T]."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.shape[1] > self.config.model.context:
            raise ValueError(f"tokens have {tokens.shape[1]} positions; the model's context "
                             f"is {self.config.model.context}")
        logits, cache = self._forward(self.params(step), tokens)
        return np.asarray(logits), np.asarray(cache["attention"])
