"""train_and_evaluate(config, workdir): the training step and the loop.

The step is written per device, as a pmap would be (gradients averaged over the
named 'data' axis), and mapped with jax.shard_map over every device of every
host inside one jax.jit. The batch of step s is a pure function of (seed, s),
so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from icl_jax import checkpoints, config as config_lib, data as data_lib, device_data, scores
from icl_jax import flops as flops_lib, prefetch, progress as progress_lib, signals
from icl_jax import workdir as workdir_lib
from icl_jax.model import init_params, loss_by_position, make_model


# batches made ahead of the step in a background thread, so that reading them and their
# copy to the device overlap the running step; 0: made synchronously before each step
PREFETCH_BATCHES = 2


class TrainingError(RuntimeError):
    """Training cannot go on (divergence, a workdir of another run); the message says why."""


class Diverged(TrainingError):
    """The loss or the gradients of member `member` stopped being finite at step `step`."""

    def __init__(self, message, step: int, member: int):
        super().__init__(message)
        self.step, self.member = step, member


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


def make_train_step(model, tx, mesh: Mesh, t, ensemble: bool = False, platform=None,
                    generator=None):
    """jit(shard_map(per-device step)): state replicated, batch split over 'data'.

    A step whose loss or gradients are not finite is recorded in state["first_bad_step"];
    with t.skip_nonfinite its update is dropped (and counted in state["skipped"]).
    ensemble: the state has a leading member axis and the batch is [member, batch, time];
    the per-device step is vmapped over members (on CPU, mapped by a loop in the program).
    generator (a device_data.DeviceSynthetic): the step takes the generator's inputs()
    (replicated; stacked for an ensemble) instead of a batch, and each device makes its own
    rows of batch state["step"].
    """
    skip_nonfinite = t.skip_nonfinite

    def per_device_step(state, tokens_BT1):
        def loss_fn(params):
            # the mean over every device's rows: its gradient is the global mean gradient.
            # (shard_map sums a replicated input's gradient over the devices by itself, so a
            # pmean of per-device gradients would be a no-op on that sum: N times the mean)
            return jax.lax.pmean(loss_by_position(model, params, tokens_BT1).mean(), "data")

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
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

    one, batch_spec = per_device_step, P("data")
    if generator is not None:
        generate = device_data.step_generator(generator, t.batch_size // mesh.shape["data"])
        one = lambda st, inputs: per_device_step(st, generate(inputs, st["step"]))  # noqa: E731
    fn = one
    if ensemble:
        batch_spec = P(None, "data")
        # platform: what the program is compiled for (an AbstractMesh has no devices)
        if (platform or mesh.devices.flat[0].platform) == "cpu":
            # XLA's CPU code runs vmapped small matmuls as slow batched kernels (0.67x of
            # sequential for 8 members); a loop over members inside the program is not
            fn = lambda st, b: jax.lax.map(lambda x: one(*x), (st, b))  # noqa: E731
        else:
            fn = jax.vmap(one)
    if generator is not None:
        batch_spec = P()  # the generator's inputs, not rows
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

def extends(saved: dict, new: dict) -> bool:
    """Whether `new` (a config as a dict) only trains the saved run for more steps, with a learning-rate and
    weight-decay schedule that does not depend on the number of steps (constant, or the
    paper's, whose drop step is fixed): then the steps so far are the same run's, and a
    resumed run with more steps is that run trained longer. A cosine schedule would have
    decayed differently, so it is a different run."""
    def without_steps(c):
        return {**c, "train": {k: v for k, v in c["train"].items() if k != "steps"}}
    return (new["train"]["steps"] > saved["train"].get("steps", 0)
            and new["train"]["schedule"] != "cosine"
            and not workdir_lib.config_diff(without_steps(config_lib.run_identity(saved)),
                                            without_steps(config_lib.run_identity(new))))


# what a divergence message suggests changing: a diverged run continues with other values
# of these from its last snapshot, as a stated continuation (recorded in history.jsonl)
CONTINUABLE = ("train.lr", "train.skip_nonfinite", "train.grad_clip")


def snapshot_config(workdir) -> tuple[int | None, dict | None]:
    """(step, config dict) saved with the newest snapshot whose config can be read: the
    run's identity (config.json is a copy of it for readers), or (None, None)."""
    steps = workdir_lib.snapshot_steps(workdir)
    if not steps:
        return None, None
    store = checkpoints.Store(workdir, read_only=True)
    try:
        for step in reversed(steps):
            try:
                return step, config_lib.upgrade(store.saved_config(step))
            except checkpoints.SnapshotError as e:
                if not e.damaged:
                    raise
    finally:
        store.close()
    return None, None


def _identity_key(d: dict) -> str:
    return json.dumps(config_lib.run_identity(d), sort_keys=True)


def _field(change: str) -> str:
    return change.split(":")[0]


def continuation(workdir, saved: dict, new: dict, saved_step) -> tuple[str | None, list[str]]:
    """How the config `new` continues the run whose snapshots were saved with `saved`:
    (None, []) the same run; (reason, changes) a continuation: trained longer (train.steps
    raised, the schedule not cosine: see extends), or, after a divergence, other values of
    CONTINUABLE; ("pending", changes) a continuation recorded but not yet saved in a
    snapshot. None as the reason with changes: a different run."""
    changes = workdir_lib.config_diff(config_lib.run_identity(saved),
                                      config_lib.run_identity(new))
    if not changes:
        return None, []
    events = [e for e in workdir_lib.read_history(workdir)
              if e["event"] in ("diverged", "continued")]
    last = events[-1] if events else {}
    if (last.get("event") == "continued" and last.get("from_step") == saved_step
            and last.get("config") == _identity_key(new)):
        return "pending", changes
    if extends(saved, new):
        return "trained longer", changes
    diverged = None  # a divergence no snapshot has been saved past
    for e in reversed(events):
        if e["event"] == "diverged":
            diverged = e
            break
        if e.get("from_step") != saved_step:
            break
    longer = (new["train"]["steps"] > saved["train"].get("steps", 0)
              and new["train"]["schedule"] != "cosine")
    if diverged and all(_field(c) in CONTINUABLE or (_field(c) == "train.steps" and longer)
                        for c in changes):
        return f"it diverged at step {diverged.get('step')}", changes
    return None, changes


def run_config(workdir):
    """The config of the run in `workdir`, to continue it (`train --workdir` without
    --config): config.json, which must agree with the copy the newest snapshot holds
    (a hand-edited config.json is refused, naming it), or that copy when config.json is
    missing (prepare_workdir writes config.json again, saying so)."""
    step, saved = snapshot_config(workdir)
    path = workdir_lib.config_path(workdir)
    if not workdir_lib.has_run(workdir):
        if saved is None:
            raise FileNotFoundError(f"{str(workdir)!r} holds no run (no {workdir_lib.CONFIG} "
                                    "and no snapshot)")
        return config_lib.from_saved(saved, f"the config saved with snapshot {step} of "
                                            f"{str(workdir)!r}")
    config = config_lib.from_saved(workdir_lib.read_config_dict(workdir), str(path))
    if saved is not None:
        reason, changes = continuation(workdir, saved, json.loads(config.to_json()), step)
        if changes and reason is None:
            raise workdir_lib.WorkdirError(
                f"{str(path)}: differs from the config saved with snapshot {step} "
                f"({', '.join(changes[:5])}): it was edited; the snapshots are the run: put it "
                "back (or delete it, to have it written again from the snapshot's copy), "
                "train with --config.x=y for what can change, or start another run with "
                "--overwrite")
    return config


def prepare_workdir(config, workdir, overwrite: bool, say=None) -> dict | None:
    """Writes the config into `workdir`, or checks it against the run there; refuses a
    different run unless `overwrite`, which clears the old run's snapshots and metrics.
    Returns the config saved with the newest snapshot (a dict), or None.

    The run there is the config its newest snapshot was saved with (config.json when it
    has none yet). A continuation (train.steps raised; after a divergence, other values
    of CONTINUABLE) is said and recorded in history.jsonl.
    On several hosts only process 0 writes or deletes, and the others wait for it.
    """
    say = say or (lambda text: print(text, file=sys.stderr))
    text = config.to_json(indent=2, sort_keys=True)
    new = json.loads(text)
    saved_step, saved, event = None, None, None
    if not overwrite:
        saved_step, saved = snapshot_config(workdir)
        if saved is None and workdir_lib.has_run(workdir):
            saved = config_lib.upgrade(workdir_lib.read_config_dict(workdir))
        if saved is not None:
            # a run measured with other eval or llc values is the same run (config.MEASUREMENT):
            # the new values are written below, for the analysis
            reason, changes = continuation(workdir, saved, new, saved_step)
            if changes and reason is None:
                raise TrainingError(f"workdir {str(workdir)!r} holds a run of a different config "
                                    f"({', '.join(changes[:5])}); pass --overwrite to replace it "
                                    "or choose another --workdir")
            if changes and saved_step is not None and reason != "pending":
                event = dict(from_step=saved_step, changes=changes, reason=reason,
                             config=_identity_key(new))
    if jax.process_index() == 0:
        if overwrite:
            workdir_lib.clear_run(workdir)
        if saved_step is not None and not workdir_lib.has_run(workdir):
            say(f"warning: {str(workdir_lib.config_path(workdir))} is missing: written again "
                f"from the config saved with snapshot {saved_step}")
            workdir_lib.add_event(workdir, "config.json restored", from_step=saved_step)
        if event:
            say(f"continuing {str(workdir)!r} from step {saved_step} with "
                f"{', '.join(event['changes'])} ({event['reason']}); recorded in "
                f"{workdir_lib.HISTORY}")
            workdir_lib.add_event(workdir, "continued", **event)
        workdir_lib.write_config(workdir, text)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"prepare_workdir {workdir}")
    return saved if saved_step is not None else None


# ----------------------------------------------------------------------------- members

class Members:
    """The runs one call trains together, each with its own config, workdir and data.

    One run is the plain case: its arrays are the model's own. An ensemble (stacked)
    holds its members' arrays on a leading axis [K, ...], and the step is mapped over it.
    """

    def __init__(self, configs, workdirs, stacked: bool):
        self.configs, self.workdirs, self.stacked = list(configs), list(workdirs), stacked
        self.batch_spec = P(None, "data") if stacked else P("data")

    def __len__(self):
        return len(self.configs)

    def shape(self, *shape) -> tuple:
        return (len(self), *shape) if self.stacked else shape

    def stack(self, trees, sharding=None):
        """One tree of the members' trees: numpy, or jax.Arrays placed with `sharding`."""
        if not self.stacked:
            return trees[0]
        if sharding is None:
            return jax.tree.map(lambda *a: np.stack(a), *trees)
        return jax.jit(lambda ts: jax.tree.map(lambda *a: jnp.stack(a), *ts),
                       out_shardings=sharding)(trees)

    def split(self, tree) -> list:
        """The members' trees of one tree."""
        if not self.stacked:
            return [tree]
        return [jax.tree.map(lambda a: a[k], tree) for k in range(len(self))]


# ----------------------------------------------------------------------------- the loop

def train_and_evaluate(config, workdir, *, overwrite: bool = False,
                       progress: bool = True, stop_after: int | None = None) -> dict:
    """Trains the model `config` describes, writing snapshots and metrics to `workdir`.

    Resumes from the newest snapshot in `workdir`. `stop_after` ends this call at
    that step with a snapshot, as a preemption would (for time-boxed jobs and tests).
    Returns the last metrics record.
    """
    return _run(Members([config], [workdir], stacked=False), overwrite, progress,
                stop_after)[0]


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
                                     "members may differ only in "
                                     f"{', '.join(config_lib.ENSEMBLE_FREE)}")
    return _run(Members(configs, workdirs, stacked=True), overwrite, progress, stop_after)


def _run(members, overwrite, progress, stop_after):
    """Checks, locks and prepares the workdirs, then trains; a bad path, vocabulary or
    batch size fails here, before anything compiles."""
    for c in members.configs:
        config_lib.validate(c)
    t = members.configs[0].train
    n_dev = jax.device_count()
    if t.batch_size % n_dev:
        raise config_lib.ConfigError(f"config field 'train.batch_size' ({t.batch_size}) must "
                                     f"be a multiple of the device count ({n_dev})")
    for w in members.workdirs:
        workdir_lib.check_usable(w)
    locks = []
    # a SIGTERM from here on (data, compile, the step-0 evaluation) ends the call cleanly
    with signals.Stop() as stop:
        try:
            if jax.process_index() == 0:
                locks = [workdir_lib.Lock(w) for w in members.workdirs]
            sources = [data_lib.make_source(c, w)
                       for c, w in zip(members.configs, members.workdirs)]
            saved = [prepare_workdir(c, w, overwrite)
                     for c, w in zip(members.configs, members.workdirs)]
            return _train(members, sources, progress, stop_after, stop, saved)
        except Diverged as err:
            if jax.process_index() == 0:
                workdir_lib.add_event(members.workdirs[err.member], "diverged", step=err.step)
            raise
        finally:
            for lock in locks:
                lock.release()


def _stopped_before_training(stop, members, progress, start) -> list | None:
    """[{}] per member if a signal came before the first step: nothing new to save (a fresh
    run starts the same way again, a resumed one from the same snapshot)."""
    received = stop.received
    if jax.process_count() > 1:  # hosts stop together
        received = _agree_to_stop(received)
    if not received:
        return None
    if progress and jax.process_index() == 0:
        print(f"received {received} before training step {start + 1}: nothing new to "
              f"save; run the same command again to {'resume' if start else 'start'}",
              file=sys.stderr)
    return [{}] * len(members)


def _train(members, sources, progress, stop_after, stop, saved_configs):
    config = members.configs[0]  # everything but ENSEMBLE_FREE is shared
    t, e, ck = config.train, config.eval, config.checkpoint
    seq_len = config.model.context + 1
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())

    # --- data: a batch is a pure function of (seed, step); each host reads only its rows
    batch_sharding = NamedSharding(mesh, members.batch_spec)
    batch_shape = members.shape(t.batch_size, seq_len)

    def host_batch(step):
        def rows(index):  # index[-2]: the batch rows of one device
            return members.stack([s.batch(step, t.batch_size, seq_len, index[-2])
                                  for s in sources])
        return jax.make_array_from_callback(batch_shape, batch_sharding, rows)

    # or made on the device inside the step, from the seed, the table and state["step"]:
    # then the step's batch input is only those (the same every step)
    generated = device_data.device_generator(sources, [c.data for c in members.configs],
                                             mesh.devices.flat[0].platform)
    generator, get_batch = None, host_batch
    if generated is not None:
        generator, gen_inputs = generated
        gen_inputs = jax.tree.map(lambda a: global_array(np.asarray(a), mesh, P()),
                                  members.stack(gen_inputs))
        get_batch = lambda step: gen_inputs  # noqa: E731

    inputs = [scores.evaluation_inputs(c, s) for c, s in zip(members.configs, sources)]
    eval_BT1 = global_array(members.stack([i["eval_BT1"] for i in inputs]), mesh, P())
    probe_BT = global_array(members.stack([i["probe_BT"] for i in inputs]), mesh, P())

    # --- model and optimizer
    model = make_model(config.model)
    tx = make_optimizer(t)

    # --- state: the newest snapshot every member can restore, or a fresh start
    stores = [checkpoints.Store(w, ck.max_to_keep, ck.async_save) for w in members.workdirs]
    try:
        start, states = _restore_members(stores, model, config, saved_configs, replicated)
    except BaseException:
        for store in stores:
            store.close()
        raise
    fresh = states is None
    if fresh:
        init = jax.jit(lambda seed, hp: {**init_state(model, tx, seed, t), "hparams": hp},
                       out_shardings=replicated)
        start, states = 0, [init(c.seed, hparams_of(c.train)) for c in members.configs]
    else:
        if jax.process_index() == 0 and progress:
            print(f"resuming {', '.join(map(str, members.workdirs))} from step {start}",
                  file=sys.stderr)
        # the config's learning rate and weight decay, which a continuation may change
        states = [{**st, "hparams": jax.tree.map(lambda v: global_array(np.asarray(v), mesh, P()),
                                                 hparams_of(c.train))}
                  for st, c in zip(states, members.configs)]
    state = members.stack(states, sharding=replicated)
    del states
    early = _stopped_before_training(stop, members, progress, start)
    if early is not None:
        for store in stores:
            store.close()
        return early

    # --- compile once, ahead of time, and say how much memory the step needs
    # measured before the step competes for cores; raised if training outruns it (MFU <= 1)
    peak = progress_lib.BoundedPeak(flops_lib.peak(config.model.dtype))
    lowered = make_train_step(model, tx, mesh, t, members.stacked,
                              generator=generator).lower(state, get_batch(start))
    t_compile = time.perf_counter()
    compiled = lowered.compile()  # from the persistent cache, when a sweep has one
    if progress and jax.process_index() == 0:
        _print_memory(compiled, len(members), time.perf_counter() - t_compile)
    early = _stopped_before_training(stop, members, progress, start)
    if early is not None:
        for store in stores:
            store.close()
        return early
    evaluate = make_eval_fn(model, e, members.stacked)

    def eval_records(params):
        return [_eval_record(o) for o in members.split(fetch(evaluate(params, eval_BT1,
                                                                      probe_BT)))]

    # --- snapshots and metrics: step 0 of a fresh run (not of one resumed from snapshot 0)
    # is evaluated and saved
    schedule = set(checkpoints.save_schedule(t.steps, ck.every, ck.log_spaced))
    config_dicts = [c.to_dict() for c in members.configs]

    def save(step):
        # the metrics first: every record up to a snapshot is stored before the snapshot
        # exists (on object storage the log is rewritten whole), so a resume lacks none
        for log in logs:
            log.flush()
        for store, member_state, config_dict in zip(stores, members.split(state), config_dicts):
            store.save(step, member_state, config_dict, force=True)

    # a fresh start keeps no record: a killed one may have logged step 0 before its snapshot
    logs = ([workdir_lib.MetricsLog(w, -1 if fresh else start) for w in members.workdirs]
            if jax.process_index() == 0 else [])
    if fresh:
        for log, rec in zip(logs, eval_records(state["params"])):
            log.write({"step": 0, "tokens": 0, "train_loss": None, "tokens_per_s": 0.0, **rec})
        if 0 in schedule:
            save(0)
    bar = progress_lib.Bar(t.steps, progress and jax.process_index() == 0, peak, start)
    metrics_log = _MetricsQueue(members, logs, bar, start,
                                t.batch_size * config.model.context,
                                flops_lib.train_flops_per_token(config.model), peak)

    # --- loop: dispatch step s+1 before reading step s's metrics, so the device never waits
    step = start
    # host batches are made (and copied) ahead in a thread; device-made ones need nothing
    batches = (prefetch.Prefetcher(get_batch, start, t.steps, PREFETCH_BATCHES)
               if PREFETCH_BATCHES and generator is None else None)
    # (the signal handler, signals.Stop, is _run's, set before the data and the compile)
    try:
        while step < t.steps:
            batch = batches.get(step) if batches else get_batch(step)
            state, metrics = compiled(state, batch)
            step += 1
            if stop_after is not None and step >= stop_after and step < t.steps:
                stop.received = stop.received or f"stop_after={stop_after}"
            stopping = stop.received
            if jax.process_count() > 1:  # hosts stop together, at a log step
                stopping = _agree_to_stop(stop.received) if step % t.log_every == 0 else None
            metrics_log.flush()  # the previous step's, now that this one runs
            is_eval = step % t.eval_every == 0 or step == t.steps
            if is_eval or step % t.log_every == 0 or step in schedule or stopping:
                metrics_log.queue(step, metrics,
                                  eval_records(state["params"]) if is_eval else None)
            if step in schedule or stopping:
                metrics_log.flush()  # a snapshot's metrics are checked before it is kept
                save(step)
            if stopping:
                stop.received = stopping
                break
        metrics_log.flush()
    finally:
        if batches:
            batches.close()
        for store in stores:
            store.close()  # always wait for the last asynchronous save
        metrics_log.close()
    if stop.received and progress:
        print(f"\nreceived {stop.received} at step {step}: snapshot saved; run the same "
              f"command again to resume from step {step}", file=sys.stderr)
    return metrics_log.records


def _print_memory(compiled, n_members, compile_s):
    mem = compiled.memory_analysis()
    if mem is not None:
        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                 + mem.temp_size_in_bytes) / 2**20
        print(f"compiled train step in {compile_s:.2f} s: {total:.1f} MiB per device "
              f"({jax.device_count()} "
              f"device(s), {jax.process_count()} process(es)"
              f"{f', {n_members} members' if n_members > 1 else ''})", file=sys.stderr)


def _eval_record(out) -> dict:
    """One member's evaluation (numpy) as fields of its metrics record."""
    pm_LH = out["prefix_matching"]
    return {"eval_loss": float(out["eval_loss"]), "icl_score": float(out["icl_score"]),
            "prefix_matching_max": float(pm_LH.max()),
            "prefix_matching_last_layer_max": float(pm_LH[-1].max()),
            "prefix_matching": pm_LH.round(4).tolist()}


class _MetricsQueue:
    """The records of logged steps: queued when their step is dispatched, completed with
    the step's loss once the device has it (checked for divergence), then written."""

    def __init__(self, members, logs, bar, start, tokens_per_step, flops_per_token, peak):
        self.members, self.logs, self.bar = members, logs, bar
        self.tokens_per_step, self.flops_per_token, self.peak = (tokens_per_step,
                                                                 flops_per_token, peak)
        self.t_last, self.step_last = time.perf_counter(), start
        self.pending, self.records = None, [{}] * len(members)

    MIN_TIMED_STEPS = 10

    def queue(self, step, metrics, evals):
        """A logged step: its throughput now, its evaluation (or None), its step metrics."""
        now = time.perf_counter()
        rec = {"step": step, "tokens": step * self.tokens_per_step}
        # steps are timed when dispatched, one ahead of the device: a span of a few steps
        # (the log-spaced early snapshots) would time the dispatch, not the work
        if step - self.step_last >= self.MIN_TIMED_STEPS:
            rate = (len(self.members) * (step - self.step_last) * self.tokens_per_step
                    / max(now - self.t_last, 1e-9))
            self.t_last, self.step_last = now, step
            rec.update(tokens_per_s=rate, mfu=self.peak.mfu(self.flops_per_token, rate))
        self.pending = ([{**rec, **ev} for ev in evals or [{}] * len(self.members)], metrics)

    def flush(self):
        if self.pending is None:
            return
        records, metrics = self.pending
        self.pending = None
        out = []
        for k, (record, m) in enumerate(zip(records, self.members.split(fetch(metrics)))):
            first_bad, skipped = int(m["first_bad_step"]), int(m["skipped"])
            if first_bad >= 0:
                w = self.members.workdirs[k]
                which = f" (member {w})" if len(records) > 1 else ""
                raise Diverged(f"training diverged at step {first_bad}{which}: the loss or the "
                               "gradients are not finite; the snapshots before it are kept: "
                               f"`icl-jax train --workdir {w} --config.train.skip_nonfinite=true` "
                               "(skips such steps), or a lower --config.train.lr or a "
                               "--config.train.grad_clip, continues from the last one",
                               first_bad, k)
            record = {**record, "train_loss": float(m["train_loss"]),
                      "grad_norm": float(m["grad_norm"])}
            if skipped:
                record["skipped_steps"] = skipped
            if self.logs:
                self.logs[k].write(record)
            out.append(record)
        self.records = out
        self.bar.update(out[0]["step"], out[0])

    def close(self):
        for log in self.logs:
            log.close()
        self.bar.close()


def _agree_to_stop(received):
    """On several hosts: stop if any host got a signal, so that all save the same step."""
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(received is not None))
    return received or ("a signal on another host" if np.any(flags) else None)


def _restore_members(stores, model, config, saved_configs, replicated):
    """(step, [state per member]) at the newest step every member can restore, or
    (None, None) for a fresh start.

    The state is restored with the optimizer of the config it was saved with (a
    continuation may have changed train.grad_clip, which adds or removes the clipping's
    state) and converted to this config's.
    """
    t = config.train
    saved_clip = next((c["train"]["grad_clip"] for c in saved_configs if c), t.grad_clip)

    def abstract_state(grad_clip):
        t_saved = ml_collections.ConfigDict(t.to_dict())
        t_saved.grad_clip = grad_clip
        tx = make_optimizer(t_saved)
        abstract = jax.eval_shape(lambda: init_state(model, tx, config.seed, t_saved))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                            abstract)

    def say(text):  # warnings: printed even when quiet
        if jax.process_index() == 0:
            print(text, file=sys.stderr)

    if all(not store.steps() for store in stores):
        return None, None
    # members killed between their saves of snapshot 0 (or before): all start afresh
    if all(set(store.steps()) <= {0} for store in stores) and any(
            not store.steps() for store in stores):
        for store in stores:
            if store.steps():
                store.remove(0)
        return None, None
    try:
        step, states = checkpoints.newest_restorable(stores, abstract_state(saved_clip), say)
    except checkpoints.SnapshotError as err:
        raise TrainingError(str(err)) from None
    if (saved_clip > 0) != (t.grad_clip > 0):
        # optax.chain(clip_by_global_norm, adamw)'s state is (EmptyState(), adamw's state)
        states = [{**st, "opt_state": (optax.EmptyState(), st["opt_state"]) if t.grad_clip > 0
                   else st["opt_state"][1]} for st in states]
    return step, states
