"""train_and_evaluate(config, workdir): the training step and the loop.

The step is written per device, as a pmap would be (gradients averaged over the
named 'data' axis), and mapped with jax.shard_map over every device of every
host inside one jax.jit. The batch of step s is a pure function of (seed, s),
so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from icl_jax import checkpoints, config as config_lib, data as data_lib, scores
from icl_jax.model import init_params, loss_by_position, make_model


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, a workdir of another run); the message says why."""


# ----------------------------------------------------------------------------- optimizer

def make_schedules(t, lr: float | None = None):
    """(learning-rate schedule, weight-decay schedule) of the `train` config section.

    lr replaces t.lr as the peak (1.0 gives the schedule's shape).
    """
    peak = t.lr if lr is None else lr
    warmup = optax.linear_schedule(0.0, peak, max(t.warmup_steps, 1))
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(t.steps - t.warmup_steps, 1), alpha=0.1)
    else:
        decay = optax.constant_schedule(peak)
    lr = optax.join_schedules([warmup, decay], [t.warmup_steps]) if t.warmup_steps else decay
    if t.schedule == "paper":  # warm-up, then weight decay lowered at a given step
        wd = optax.join_schedules([optax.constant_schedule(t.weight_decay),
                                   optax.constant_schedule(t.weight_decay_after)],
                                  [t.weight_decay_drop_step])
    else:
        wd = optax.constant_schedule(t.weight_decay)
    return lr, wd


def make_optimizer(t):
    """AdamW (plus clipping) whose learning rate and weight decay are set every step.

    They sit in the optimizer state (optax.inject_hyperparams) and the step writes
    them from state["hparams"] and the schedules, so that ensemble members that
    differ in learning rate or weight decay share one compiled, vmapped step.
    """
    adamw = optax.inject_hyperparams(optax.adamw)(
        learning_rate=0.0, weight_decay=0.0, b1=t.b1, b2=t.b2,
        # no decay on biases, LayerNorm and smear scalars
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    if t.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
    return adamw


def hparams_of(t) -> dict:
    """The per-run hyperparameters that ensemble members may differ in."""
    return {"lr": jnp.float32(t.lr), "weight_decay": jnp.float32(t.weight_decay),
            "weight_decay_after": jnp.float32(t.weight_decay_after)}


def _with_hparams(opt_state, t, hp, step):
    """opt_state with this step's learning rate and weight decay written in."""
    lr_shape, _ = make_schedules(t, lr=1.0)
    wd = hp["weight_decay"]
    if t.schedule == "paper":
        wd = jnp.where(step >= t.weight_decay_drop_step, hp["weight_decay_after"], wd)
    values = {"learning_rate": hp["lr"] * lr_shape(step), "weight_decay": wd}

    def put(st):
        return st._replace(hyperparams={**st.hyperparams, **{
            k: jnp.asarray(v, st.hyperparams[k].dtype) for k, v in values.items()}})

    if isinstance(opt_state, tuple) and not hasattr(opt_state, "hyperparams"):
        return tuple(put(x) if hasattr(x, "hyperparams") else x for x in opt_state)
    return put(opt_state)


# ----------------------------------------------------------------------------- step

def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def make_train_step(model, tx, mesh: Mesh, t, ensemble: bool = False, platform=None):
    """jit(shard_map(per-device step)): state replicated, batch split over 'data'.

    A step whose loss or gradients are not finite is recorded in state["first_bad_step"];
    with t.skip_nonfinite its update is dropped (and counted in state["skipped"]).
    ensemble: the state has a leading member axis and the batch is [member, batch, time];
    the per-device step is vmapped over members (on CPU, mapped by a loop in the program).
    """
    skip_nonfinite = t.skip_nonfinite

    def per_device_step(state, tokens_BT1):
        def loss_fn(params):
            return loss_by_position(model, params, tokens_BT1).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        grads = jax.lax.pmean(grads, "data")
        loss = jax.lax.pmean(loss, "data")
        opt_state = _with_hparams(state["opt_state"], t, state["hparams"], state["step"])
        updates, opt_state = tx.update(grads, opt_state, state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        step = state["step"] + 1
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        first_bad = jnp.where(~finite & (state["first_bad_step"] < 0), step,
                              state["first_bad_step"])
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
            params = keep(params, state["params"])
            opt_state = keep(opt_state, state["opt_state"])
            first_bad = state["first_bad_step"]
        new_state = {"step": step, "params": params, "opt_state": opt_state,
                     "hparams": state["hparams"],
                     "skipped": state["skipped"] + (~finite).astype(jnp.int32),
                     "first_bad_step": first_bad}
        return new_state, {"train_loss": loss, "grad_norm": grad_norm, "skipped": new_state["skipped"],
                           "first_bad_step": first_bad}

    fn, batch_spec = per_device_step, P("data")
    if ensemble:
        batch_spec = P(None, "data")
        # platform: what the program is compiled for (an AbstractMesh has no devices)
        if (platform or mesh.devices.flat[0].platform) == "cpu":
            # XLA's CPU code runs vmapped small matmuls as slow batched kernels (0.67x of
            # sequential for 8 members); a loop over members inside the program is not
            fn = lambda st, b: jax.lax.map(lambda x: per_device_step(*x), (st, b))  # noqa: E731
        else:
            fn = jax.vmap(per_device_step)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P(), batch_spec), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=0)


def make_eval_fn(model, e, ensemble: bool = False):
    """Eval metrics of one params tree (or, ensemble, of a stack): loss, ICL score,
    prefix matching per head."""

    def evaluate(params, eval_BT1, probe_BT):
        losses_T = scores.mean_loss_by_position(model, params, eval_BT1)
        pm_LH = scores.prefix_matching(model, params, probe_BT, e.probe_tokens)
        return {"eval_loss": losses_T.mean(),
                "icl_score": scores.icl_score_from_losses(losses_T, e.icl_early_index,
                                                          e.icl_late_index),
                "prefix_matching": pm_LH}

    return jax.jit(jax.vmap(evaluate) if ensemble else evaluate)


def init_state(model, tx, seed: int, t):
    params = init_params(model, jax.random.key(seed))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "hparams": hparams_of(t),
            "skipped": jnp.zeros((), jnp.int32), "first_bad_step": jnp.full((), -1, jnp.int32)}


def global_array(x: np.ndarray, mesh: Mesh, spec: P, global_shape=None):
    """This host's rows (or the whole array, when replicated) as one global jax.Array."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, global_shape)


def fetch(x):
    """A replicated jax.Array (or tree) as numpy, on any host."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), x)


# ----------------------------------------------------------------------------- workdir

def prepare_workdir(config, workdir: str, overwrite: bool):
    """Writes config.json, or checks it against the saved one; refuses a different run.

    On several hosts only process 0 writes or deletes, and the others wait for it.
    """
    path = os.path.join(workdir, "config.json")
    text = config.to_json(indent=2, sort_keys=True)
    if os.path.exists(path) and not overwrite:
        with open(path) as f:
            saved = config_lib.upgrade(json.load(f))
        if saved != json.loads(text):
            changed = _diff(saved, json.loads(text))
            raise TrainingError(f"workdir {workdir!r} holds a run of a different config "
                                f"({', '.join(changed[:5])}); pass --overwrite to replace it "
                                "or choose another --workdir")
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        if overwrite:
            import shutil
            shutil.rmtree(os.path.join(workdir, "snapshots"), ignore_errors=True)
            if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
                os.remove(os.path.join(workdir, "metrics.jsonl"))
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"prepare_workdir {workdir}")


def _diff(a, b, prefix=""):
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _diff(a[k], b[k], prefix + k + ".")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


class MetricsLog:
    """metrics.jsonl, trimmed on resume so no step appears twice."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = [r for r in checkpoints.read_metrics(workdir) if r["step"] <= resume_step]
        self.enabled = jax.process_index() == 0
        if self.enabled:
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(self.path + ".tmp", self.path)
            self.file = open(self.path, "a")

    def write(self, record: dict):
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.enabled:
            self.file.close()


class Progress:
    """One line redrawn in place on a terminal; a log line every so often otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and jax.process_index() == 0
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0

    def update(self, step: int, record: dict):
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total}", f"loss {record['train_loss']:.3f}",
                 f"{record['tokens_per_s']:,.0f} tok/s"]
        if "icl_score" in record:
            parts += [f"icl {record['icl_score']:+.3f}",
                      f"prefix-match {record['prefix_matching_max']:.2f}"]
        frac = step / self.total
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        line = f"[{bar}] " + "  ".join(parts)
        if self.tty:
            sys.stderr.write("\r" + line + " " * 4)
            sys.stderr.flush()
        elif "icl_score" in record or time.time() - self.last_print > 30 or step == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last_print = time.time()

    def close(self):
        if self.enabled and self.tty:
            sys.stderr.write("\n")


class _StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves a snapshot at the current step and exits."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config, workdir: str, *, overwrite: bool = False,
                       progress: bool = True, stop_after: int | None = None) -> dict:
    """Trains the model `config` describes, writing snapshots and metrics to `workdir`.

    Resumes from the newest snapshot in `workdir`. `stop_after` ends this call at
    that step with a snapshot, as a preemption would (for time-boxed jobs and tests).
    Returns the last metrics record.
    """
    return _run([config], [workdir], overwrite, progress, stop_after, ensemble=False)[0]


ENSEMBLE_FREE = config_lib.ENSEMBLE_FREE


def ensemble_mismatch(configs) -> str | None:
    """The first field (other than ENSEMBLE_FREE) in which the configs differ, or None."""
    flat = [config_lib.flatten(c.to_dict()) for c in configs]
    for key in sorted(set().union(*flat)):
        if config_lib.ensemble_free(key):
            continue
        if len({json.dumps(f.get(key)) for f in flat}) > 1:
            return key
    return None


def train_ensemble(configs, workdirs, *, overwrite: bool = False, progress: bool = True,
                   stop_after: int | None = None) -> list[dict]:
    """Trains several members in one compiled program: their states are stacked on a
    leading axis and the per-device step is vmapped over it, each member with its own
    seed, data stream and learning rate. Each workdir ends up exactly as if its member
    had been trained alone. Members may differ only in seed, train.lr,
    train.weight_decay(_after) and data fields."""
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("train_ensemble needs one workdir per config")
    for c in configs:
        config_lib.validate(c)
    bad = ensemble_mismatch(configs)
    if bad:
        raise config_lib.ConfigError(f"config field {bad!r} differs between ensemble members; "
                                     f"members may differ only in {', '.join(ENSEMBLE_FREE)}")
    return _run(configs, workdirs, overwrite, progress, stop_after, ensemble=True)


def _run(configs, workdirs, overwrite, progress, stop_after, ensemble):
    for c in configs:
        config_lib.validate(c)
    t = configs[0].train
    n_dev = jax.device_count()
    if t.batch_size % n_dev:
        raise config_lib.ConfigError(f"config field 'train.batch_size' ({t.batch_size}) must "
                                     f"be a multiple of the device count ({n_dev})")
    # --- workdirs and data: a bad path or vocabulary fails before anything compiles
    locks = []
    try:
        for w in workdirs:
            if jax.process_index() == 0:
                locks.append(checkpoints.WorkdirLock(w))
        sources = [data_lib.make_source(c, w) for c, w in zip(configs, workdirs)]
        for c, w in zip(configs, workdirs):
            prepare_workdir(c, w, overwrite)
        return _train(configs, workdirs, sources, progress, stop_after, ensemble)
    finally:
        for lock in locks:
            lock.release()


def _stack(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _train(configs, workdirs, sources, progress, stop_after, ensemble):
    config = configs[0]  # everything but ENSEMBLE_FREE is shared
    t, e, ck = config.train, config.eval, config.checkpoint
    K = len(configs)
    n_dev = jax.device_count()
    seq_len = config.model.context + 1
    lead = (lambda x: x) if not ensemble else _stack  # member axis, when there is one
    member = (lambda tree, k: tree) if not ensemble else (
        lambda tree, k: jax.tree.map(lambda a: a[k], tree))

    # --- model, optimizer, mesh
    model = make_model(config.model)
    tx = make_optimizer(t)
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    train_step = make_train_step(model, tx, mesh, t, ensemble)
    evaluate = make_eval_fn(model, e, ensemble)
    evals = [s.eval_set(e.n_examples, seq_len) for s in sources]
    probes = [scores.make_probe(s.token_frequencies(), e.probe_tokens, e.probe_repeats,
                                e.probe_sequences, e.probe_exclude_frac, e.bos_token, c.seed)
              for s, c in zip(sources, configs)]
    eval_BT1 = global_array(np.stack(evals) if ensemble else evals[0], mesh, P())
    probe_BT = global_array(np.stack(probes) if ensemble else probes[0], mesh, P())

    # --- state: restore the newest snapshot (every member at one step), or start fresh
    stores = [checkpoints.Store(w, ck.max_to_keep, ck.async_save) for w in workdirs]
    abstract = jax.eval_shape(lambda: init_state(model, tx, config.seed, t))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                            abstract)
    start, states = _restore_members(stores, abstract, workdirs)
    if states is None:
        init = jax.jit(lambda seed, hp: {**init_state(model, tx, seed, t), "hparams": hp},
                       out_shardings=replicated)
        states = [init(c.seed, hparams_of(c.train)) for c in configs]
        start = 0
    elif jax.process_index() == 0 and progress:
        print(f"resuming {', '.join(workdirs)} from step {start}", file=sys.stderr)
    state = jax.jit(lead, out_shardings=replicated)(states) if ensemble else states[0]
    del states
    schedule = set(checkpoints.snapshot_steps(t.steps, ck.every, ck.log_spaced))
    config_dicts = [c.to_dict() for c in configs]

    # --- compile once, ahead of time, and say how much memory the step needs
    batch_sharding = NamedSharding(mesh, P(None, "data") if ensemble else P("data"))
    batch_shape = (K, t.batch_size, seq_len) if ensemble else (t.batch_size, seq_len)

    def get_batch(step):
        """The global batch of `step`; each host reads only the rows its devices hold."""
        def rows(index):
            r = index[1] if ensemble else index[0]
            local = [s.batch(step, t.batch_size, seq_len, r) for s in sources]
            return np.stack(local) if ensemble else local[0]
        return jax.make_array_from_callback(batch_shape, batch_sharding, rows)

    compiled = train_step.lower(state, get_batch(start)).compile()
    if progress and jax.process_index() == 0:
        mem = compiled.memory_analysis()
        if mem is not None:
            total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                     + mem.temp_size_in_bytes) / 2**20
            print(f"compiled train step: {total:.1f} MiB per device ({n_dev} device(s), "
                  f"{jax.process_count()} process(es){f', {K} members' if ensemble else ''})",
                  file=sys.stderr)

    logs = [MetricsLog(w, start) for w in workdirs]
    bar = Progress(t.steps, progress)
    tokens_per_step = t.batch_size * config.model.context

    def eval_records(params):
        out = fetch(evaluate(params, eval_BT1, probe_BT))
        recs = []
        for k in range(K):
            o = member(out, k)
            pm = o["prefix_matching"]
            recs.append({"eval_loss": float(o["eval_loss"]), "icl_score": float(o["icl_score"]),
                         "prefix_matching_max": float(pm.max()),
                         "prefix_matching_last_layer_max": float(pm[-1].max()),
                         "prefix_matching": pm.round(4).tolist()})
        return recs

    def save(step):
        for k, store in enumerate(stores):
            store.save(step, member(state, k), config_dicts[k], force=True)

    if start == 0:
        if 0 in schedule:
            save(0)
        for log, rec in zip(logs, eval_records(state["params"])):
            log.write({"step": 0, "tokens": 0, "train_loss": None, "tokens_per_s": 0.0, **rec})

    # --- loop: dispatch step s+1 before reading step s's metrics, so the device never waits
    records = [{}] * K
    step = start
    pending = None
    t_last, step_last = time.perf_counter(), start
    stop = _StopSignal()
    try:
        stop.__enter__()
        while step < t.steps:
            batch = get_batch(step)
            state, metrics = compiled(state, batch)
            step += 1
            if stop_after is not None and step >= stop_after and step < t.steps:
                stop.received = stop.received or f"stop_after={stop_after}"
            stopping = stop.received
            if jax.process_count() > 1:  # hosts stop together, at a log step
                stopping = _agree_to_stop(stop.received) if step % t.log_every == 0 else None
            if pending is not None:
                records = _finish(*pending, logs, bar, member)
            pending = None
            is_log = (step % t.log_every == 0 or step % t.eval_every == 0 or step == t.steps
                      or step in schedule)
            if is_log or stopping:
                now = time.perf_counter()
                rate = K * (step - step_last) * tokens_per_step / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                rec = {"step": step, "tokens": step * tokens_per_step, "tokens_per_s": rate}
                evals_k = (eval_records(state["params"])
                           if step % t.eval_every == 0 or step == t.steps else [{}] * K)
                pending = ([{**rec, **ev} for ev in evals_k], metrics)
            if step in schedule or stopping:
                if pending is not None:  # a snapshot's metrics must be checked before it is kept
                    records = _finish(*pending, logs, bar, member)
                    pending = None
                save(step)
            if stopping:
                stop.received = stopping
                break
        if pending is not None:
            records = _finish(*pending, logs, bar, member)
    finally:
        stop.__exit__()
        for store in stores:
            store.close()  # always wait for the last asynchronous save
        for log in logs:
            log.close()
        bar.close()
    if stop.received and progress:
        print(f"\nreceived {stop.received} at step {step}: snapshot saved; run the same "
              f"command again to resume from step {step}", file=sys.stderr)
    return records


def _agree_to_stop(received):
    """On several hosts: stop if any host got a signal, so that all save the same step."""
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(received is not None))
    return received or ("a signal on another host" if np.any(flags) else None)


def _restore_members(stores, abstract, workdirs):
    """(step, [state per member]) at the newest step every member can restore."""
    try:
        found = [store.restore_newest(abstract) for store in stores]
    except RuntimeError as err:
        raise TrainingError(str(err)) from None
    if all(state is None for _, state in found):
        return None, None
    steps = [step for step, _ in found]
    if len(set(steps)) == 1:
        return steps[0], [state for _, state in found]
    common = min(s if s is not None else -1 for s in steps)
    if common < 0 or any(common not in store.steps() for store in stores):
        raise TrainingError(f"ensemble members were saved at different steps ({steps}) with no "
                            f"step in common; resume them one by one: {', '.join(workdirs)}")
    return common, [store.restore(common, abstract) for store in stores]


def _finish(records, metrics, logs, bar, member):
    out = []
    m_all = fetch(metrics)
    for k, (record, log) in enumerate(zip(records, logs)):
        m = member(m_all, k)
        first_bad, skipped = m["first_bad_step"], m["skipped"]
        record = {**record, "train_loss": float(m["train_loss"]),
                  "grad_norm": float(m["grad_norm"])}
        if int(skipped):
            record["skipped_steps"] = int(skipped)
        if int(first_bad) >= 0:
            raise TrainingError(f"training diverged at step {int(first_bad)}"
                                f"{f' (member {log.path})' if len(logs) > 1 else ''}: the loss "
                                "or the gradients are not finite; the snapshots before it are "
                                "kept (--config.train.skip_nonfinite=true skips such steps instead)")
        log.write(record)
        out.append(record)
    bar.update(out[0]["step"], out[0])
    return out
