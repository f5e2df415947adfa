"""Snapshots: the schedule, the orbax store, and Run, the one reader of a trained run.

Where a snapshot lives is workdir.py's business; each snapshot carries the train
state and the config that made it.
"""
from __future__ import annotations

import logging
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from icl_jax import workdir as workdir_lib


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

    def __init__(self, workdir, max_to_keep: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.workdir = workdir
        # orbax wants an absolute path (a bucket's already is)
        self.directory = workdir_lib.snapshots_dir(workdir_lib.absolute(workdir))
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
        moved aside to workdir.corrupt_dir, never overwritten, with a warning.
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
        """Moves snapshot `step` into the workdir's corrupt folder (never overwriting one)."""
        dst_dir = workdir_lib.corrupt_dir(self.workdir)
        dst_dir.mkdir(parents=True, exist_ok=True)
        dst, n = dst_dir / str(step), 1
        while dst.exists():
            dst, n = dst_dir / f"{step}.{n}", n + 1
        (self.directory / str(step)).rename(dst)
        self.manager.reload()
        return str(dst)

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
        # FileNotFoundError naming the workdir when it holds no run or no snapshot
        self.config = config_lib.from_dict(workdir_lib.read_config_dict(workdir))
        if not workdir_lib.snapshot_steps(workdir):
            raise FileNotFoundError(f"{str(workdir)!r} has no snapshots yet")
        self.model = make_model(self.config.model)
        self.abstract_params = jax.eval_shape(lambda: init_params(self.model, jax.random.key(0)))
        self._store = Store(workdir, read_only=True)
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
