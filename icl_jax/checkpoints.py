"""Snapshots: the schedule, the orbax store, and Run, the notebook view of a workdir.

A workdir holds config.json, metrics.jsonl and snapshots/<step>/ (orbax), each
snapshot carrying the train state and the config that made it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp


def snapshot_steps(total_steps: int, every: int, log_spaced: int) -> list[int]:
    """Step 0, `log_spaced` log-spaced steps below `every`, every `every` steps, and the last."""
    steps = {0, total_steps}
    steps.update(range(every, total_steps + 1, every))
    if log_spaced:
        early = np.geomspace(1, min(every, total_steps), log_spaced + 1)
        steps.update(int(round(s)) for s in early)
    return sorted(s for s in steps if 0 <= s <= total_steps)


class Store:
    """The orbax CheckpointManager of one workdir; async saves, every snapshot kept by default."""

    def __init__(self, workdir: str, max_to_keep: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "snapshots"))
        # orbax logs read-only mode and every save at WARNING/INFO through absl: noise here
        logging.getLogger("absl").setLevel(logging.ERROR)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep or None,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            # a kill mid-save leaves a tmp folder that must not be mistaken for a snapshot
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "config"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, config_dict: dict, force: bool = False):
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict)),
            force=force)

    def restore(self, step: int, abstract_state):
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return out["state"]

    def restore_newest(self, abstract_state):
        """(step, state) of the newest snapshot that restores, or (None, None) if none exist.

        Snapshots newer than it that fail to restore (a truncated or missing file) are
        moved aside to <workdir>/corrupt_snapshots/, never overwritten, with a warning.
        If no snapshot restores, that is an error, not a fresh start.
        """
        failed = []
        for step in reversed(self.steps()):
            try:
                state = self.restore(step, abstract_state)
            except Exception as e:  # orbax raises many kinds for damaged files
                failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
                continue
            for bad, why in failed:
                moved = self.quarantine(bad)
                print(f"warning: snapshot {bad} could not be restored ({why}); moved to "
                      f"{moved}; resuming from step {step}", file=sys.stderr)
            return step, state
        if failed:
            raise RuntimeError(f"no snapshot in {self.directory} could be restored; newest: "
                               f"step {failed[0][0]} ({failed[0][1]})")
        return None, None

    def quarantine(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst_dir = os.path.join(os.path.dirname(self.directory), "corrupt_snapshots")
        os.makedirs(dst_dir, exist_ok=True)
        dst, n = os.path.join(dst_dir, str(step)), 1
        while os.path.exists(dst):
            dst, n = os.path.join(dst_dir, f"{step}.{n}"), n + 1
        os.rename(src, dst)
        self.manager.reload()
        return dst

    def restore_params(self, step: int, abstract_params):
        """Only the params of a snapshot (no optimizer state), e.g. for scoring."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      {"params": abstract_params}),
            partial_restore=True)))
        return out["state"]["params"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


class WorkdirLock:
    """An exclusive lock on a workdir, so two train processes never write to one run."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, ".lock")
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


def read_metrics(workdir: str) -> list[dict]:
    """metrics.jsonl as a list; a last line cut short by a crash is ignored."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


class Run:
    """A trained run, for notebooks: Run('runs/2l').forward(tokens, step=None)."""

    def __init__(self, workdir: str):
        from icl_jax import config as config_lib
        from icl_jax.model import init_params, make_model

        path = os.path.join(workdir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{workdir!r} holds no run (no config.json)")
        self.workdir = workdir
        with open(path) as f:
            self.config = config_lib.from_json(f.read())
        self.model = make_model(self.config.model)
        self._abstract = jax.eval_shape(lambda: init_params(self.model, jax.random.key(0)))
        self._store = Store(workdir, read_only=True)
        self._cache = {}
        self._forward = jax.jit(lambda p, t: self.model.apply({"params": p}, t))

    @property
    def steps(self) -> list[int]:
        return self._store.steps()

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.workdir)

    def params(self, step: int | None = None):
        steps = self.steps
        if not steps:
            raise FileNotFoundError(f"{self.workdir!r} has no snapshots yet")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise KeyError(f"no snapshot at step {step}; saved steps: {steps}")
        if step not in self._cache:
            self._cache[step] = self._store.restore_params(step, self._abstract)
        return self._cache[step]

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
