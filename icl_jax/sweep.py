"""icl-jax sweep: many configs, one workdir each, trained N at a time, indexed in sweep.json.

A sweep file is Python that icl-jax executes (load only files you trust): a built-in one
by name (`paper_small:attn`, icl_jax/configs/sweeps/) or a path to your own, with
get_sweep(arg) returning
  base:      a config spec: a built-in config by name, "small:layers=2", or a file's path
  overrides: {field: value} for every member
  members:   {name: {"arg": config arg replacing the base's, "overrides": {field: value}}}
             (product() below builds members from a grid).
Every member's config is resolved and validated before anything starts. Each member
trains in <workdir>/<name> in its own `python -m icl_jax train` process (so that N
run at a time and one crash does not end the sweep), logging to <name>/train.log.
Finished members are skipped, unfinished ones resume. <workdir>/sweep.json is the
index, rewritten atomically whenever a member starts or ends; a sweep started again
writes each entry from the member's folder (done, running, pending), whatever a killed
sweep left. On Linux a member's process gets SIGTERM when its sweep dies, even by SIGKILL.

A sweep file, like a config file, is Python that icl-jax runs: load only files you trust.
"""
from __future__ import annotations

import datetime
import fcntl
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

from icl_jax import config as config_lib, progress as progress_lib, signals
from icl_jax import workdir as workdir_lib
from icl_jax.config import ConfigError

INDEX = "sweep.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


# ----------------------------------------------------------------------------- sweep files

def _fmt(value) -> str:
    """A value as text, for --config.x=<text> and member names: 1e-3, true, 0.5."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and not 1e-2 <= abs(value) < 1e4:
            mantissa, exp = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{value:g}"
    return str(value)


def product(grid: dict, arg: str | None = None, overrides: dict | None = None) -> dict:
    """Members for every combination of a grid, named by its values in grid order.

    product({"train.lr": [1e-3, 3e-3], "seed": [0, 1]}) ->
      {"lr=1e-3_seed=0": {"arg": None, "overrides": {"train.lr": 0.001, "seed": 0}}, ...}
    """
    short = {k: k.rsplit(".", 1)[-1] for k in grid}
    if len(set(short.values())) < len(short):  # two fields share a last name: spell them out
        short = {k: k for k in grid}
    members = {}
    for values in itertools.product(*grid.values()):
        name = "_".join(f"{short[k]}={_fmt(v)}" for k, v in zip(grid, values))
        members[name] = {"arg": arg, "overrides": {**(overrides or {}), **dict(zip(grid, values))}}
    return members


def family_on(base: str, arg=None) -> dict:
    """The paper's family (the built-in paper_small sweep's `family` subset) on one base
    config spec ("small", or a config file's path): what each `icl-jax reproduce`
    profile's sweep file returns, so that the family is defined once."""
    if arg:
        raise ValueError(f"takes no argument, got {arg!r}; override fields with --config.x=y")
    return {**load_sweep("paper_small:family"), "base": base}


def load_sweep(spec: str) -> dict:
    """'paper_small:attn' (a built-in sweep) or 'my_sweep.py:attn' (a file) ->
    {"base", "overrides", "members"} (plain dicts)."""
    path, _, arg = spec.partition(":")
    path = config_lib.find_file(path, kind="sweep")
    sweep = config_lib.call_file_function(path, "get_sweep", arg, kind="sweep")
    if hasattr(sweep, "to_dict"):
        sweep = sweep.to_dict()
    unknown = set(sweep) - {"base", "overrides", "members"}
    if unknown or "base" not in sweep or not sweep.get("members"):
        raise ConfigError(f"sweep file {path!r}: get_sweep must return base, members and "
                          f"optionally overrides" + (f"; unknown: {sorted(unknown)}" if unknown
                                                     else ""))
    return {"base": sweep["base"], "overrides": dict(sweep.get("overrides") or {}),
            "members": dict(sweep["members"])}


# ----------------------------------------------------------------------------- members

class Member:
    """One run of a sweep: its name, config spec, overrides (as text) and validated config."""

    def __init__(self, name, spec, overrides, config, workdir):
        self.name, self.spec, self.overrides = name, spec, overrides
        self.config, self.workdir = config, workdir

    def command(self) -> list[str]:
        return ([sys.executable, "-m", "icl_jax", "train", "--config", self.spec,
                 "--workdir", self.workdir]
                + [f"--config.{k}={v}" for k, v in self.overrides.items()])

    def __repr__(self):
        return f"Member({self.name!r}, {self.spec!r}, {self.overrides})"


def resolve(spec: str, workdir: str, overrides: dict | None = None,
            members: list[str] | None = None) -> list[Member]:
    """Every selected member with its validated config; a bad one is a ConfigError naming it.

    overrides (text, from --config.x=y) apply to every member, after the sweep's own.
    """
    sweep = load_sweep(spec)
    base_path, _, base_arg = sweep["base"].partition(":")
    found = config_lib.find_file(base_path)
    # a built-in config by its name, a user's file by its absolute path: members train
    # in processes of their own, from any folder
    base_path = ({p: n for n, p in config_lib.builtin().items()}.get(found)
                 or (os.path.abspath(found) if os.path.isfile(found) else found))
    names = list(sweep["members"])
    if members:
        unknown = [n for n in members if n not in sweep["members"]]
        if unknown:
            raise ConfigError(f"unknown sweep member(s) {', '.join(map(repr, unknown))}; "
                              f"members: {', '.join(names)}")
        names = [n for n in names if n in members]
    out = []
    for name in names:
        entry = sweep["members"][name] or {}
        if not isinstance(name, str) or not _NAME.match(name) or name == "analysis":
            raise ConfigError(f"sweep member name {name!r} must be a folder name of letters, "
                              "digits and ._=+- (and not 'analysis')")
        extra = set(entry) - {"arg", "overrides"}
        if extra:
            raise ConfigError(f"sweep member {name!r}: unknown key(s) {sorted(extra)}; "
                              "valid: arg, overrides")
        arg = entry.get("arg")
        arg = base_arg if arg is None else arg
        member_spec = f"{base_path}:{arg}" if arg else base_path
        texts = {k: _fmt(v) for k, v in {**sweep["overrides"],
                                         **(entry.get("overrides") or {})}.items()}
        texts.update({k: str(v) for k, v in (overrides or {}).items()})
        try:
            config = config_lib.load_validated(member_spec, texts)
        except ConfigError as e:
            raise ConfigError(f"sweep member {name!r}: {e.args[0]}") from None
        out.append(Member(name, member_spec, texts, config, os.path.join(workdir, name)))
    return out


def ensemble_key(config) -> str:
    """Configs with equal keys can train as one vmapped ensemble: equal in everything but
    seed, train.lr, train.weight_decay(_after) and data fields (so equal model shapes)."""
    flat = config_lib.flatten(config.to_dict() if hasattr(config, "to_dict") else config)
    kept = {k: v for k, v in flat.items() if not config_lib.ensemble_free(k)}
    return json.dumps(kept, sort_keys=True)


# ----------------------------------------------------------------------------- state on disk



def finished(member: Member) -> bool:
    return workdir_lib.is_finished(member.workdir, member.config)


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


class Index:
    """<workdir>/sweep.json, one entry per member; written by process 0 only, atomically."""

    def __init__(self, workdir: str, spec: str, members: list[Member]):
        self.path = os.path.join(workdir, INDEX)
        self.remote = workdir_lib.is_remote(workdir)
        self.enabled = _process_id() == 0
        old = self._read().get("members", {})
        self.data = {"sweep": spec, "workdir": workdir, "members": old}
        self.mine = [m.name for m in members]
        for m in members:
            entry = old.get(m.name, {})
            entry.update({"workdir": m.workdir, "config": m.spec, "overrides": m.overrides,
                          "command": shlex.join(m.command()), "steps": m.config.train.steps,
                          "last_step": workdir_lib.newest_snapshot(m.workdir)})
            entry.update(_true_status(m, entry.get("status", "pending")))
            self.data["members"][m.name] = entry

    def update(self, name: str, **fields):
        self.data["members"][name].update(fields)
        self.write()

    def _read(self) -> dict:
        """sweep.json as it is; {} if there is none or it is damaged (it is an index of the
        members' folders, written again from them)."""
        try:
            data = json.loads(workdir_lib.path(self.path).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("members", {}), dict):
            if self.enabled and not getattr(self, "_warned", False):
                print(f"warning: {self.path} is damaged; written again from the members' "
                      "folders", file=sys.stderr)
                self._warned = True
            return {}
        return data

    def _merged(self) -> str:
        on_disk = self._read()
        merged = {**on_disk, **{k: v for k, v in self.data.items() if k != "members"}}
        merged["members"] = {**on_disk.get("members", {}),
                             **{n: self.data["members"][n] for n in self.mine}}
        merged["updated"] = _now()
        return json.dumps(merged, indent=1)

    def write(self):
        """Merges this sweep's members into the file, under a lock locally: several sweeps
        (a SLURM array, one member each) may share one index. On object storage there is
        no lock: one sweep process per index."""
        if not self.enabled:
            return
        if self.remote:
            workdir_lib.write_text(self.path, self._merged())
            return
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(self._merged())
            os.replace(tmp, self.path)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _true_status(m: Member, recorded: str) -> dict:
    """What a member's index entry must say when a sweep starts, whatever an earlier sweep
    left there (a sweep killed outright leaves "running"): done if its run is finished,
    running (with the pid) while a trainer holds its workdir, failed as recorded until it
    is tried again, else pending."""
    if finished(m):
        return {"status": "done", "pid": None}
    owner = workdir_lib.read_lock(m.workdir)
    # on object storage a killed trainer's lock stays behind: dead if its pid is gone here
    if owner is not None and not workdir_lib.Lock.owner_is_dead_here(owner):
        return {"status": "running", "pid": owner.get("pid")}
    return {"status": "failed" if recorded == "failed" else "pending", "pid": None}


def _parent_death_signal():
    """A function for a member's process to run before it starts (subprocess's preexec_fn):
    the kernel sends it SIGTERM when the sweep's process dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so that no trainer outlives its sweep; it saves a snapshot and
    exits, as on any SIGTERM. None where there is no such signal. prctl is looked up here,
    in the sweep, so that the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()
    PR_SET_PDEATHSIG = 1

    def die_with_parent():
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the sweep died before the line above took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return die_with_parent


def _process_id() -> int:
    from icl_jax import distributed
    return distributed.env_process_id()


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(os.path.getsize(path) - 4096, 0))
            lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("error:")]
        return (errors or lines or [""])[-1].strip()[:300]
    except OSError:
        return ""


# ----------------------------------------------------------------------------- processes

def _accelerator_present() -> bool:
    """Without importing jax (which would take the accelerator from the children)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    return any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/kfd", "/dev/accel0"))


def compilation_cache() -> str | None:
    """Where compiled programs are kept across runs: $JAX_COMPILATION_CACHE_DIR if set ('' in
    that variable turns it off), else <cache root>/jax ($ICL_JAX_CACHE/jax, else
    ~/.cache/icl_jax/jax: beside the text data's cache, corpus.cache_root). One place for
    every workdir: the members of a sweep, a reproduction in a new workdir and a run resumed
    find the programs an earlier one compiled (jax keys them by program, jax version and
    device, so a stale entry is never used)."""
    given = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if given is not None:
        return given or None
    from icl_jax.corpus import cache_root
    return os.path.join(cache_root(), "jax")


def cache_env(directory: str) -> dict:
    """The environment variables that point a process's jax, from its start, at the
    persistent cache `directory` with use_compilation_cache's settings."""
    return {"JAX_COMPILATION_CACHE_DIR": directory,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def use_compilation_cache(directory: str | None):
    """Points this process's jax at `directory`, caching every compilation: the small
    models here compile in well under jax's default 1 s threshold, and -1 (no minimum
    entry size) also keeps jax from raising the size threshold for the filesystem."""
    if directory:
        import jax
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def child_env(jobs: int, cache: str | None = None) -> dict:
    """The environment of one member's process when `jobs` run at once.

    On CPU each child gets a single-threaded XLA (Eigen) so that N children share the
    cores instead of fighting over them (pinning each to a core measured no better: the
    kernel balances better than a fixed split on a shared machine); on a GPU each gets
    1/N of its memory. Every child shares the sweep's compilation cache.
    """
    env = dict(os.environ)
    if cache:
        env.update(cache_env(cache))
    if jobs > 1:
        if _accelerator_present():
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.2f}")
        elif "xla_cpu_multi_thread_eigen" not in env.get("XLA_FLAGS", ""):
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                                + " --xla_cpu_multi_thread_eigen=false").strip()
    return env


def member_cost(m) -> int:
    """A member's training FLOPs (steps x one step's): with several at a time the pool
    starts the costliest first, so that the longest member does not run alone at the end."""
    from icl_jax.flops import train_flops
    c = m.config
    return c.train.steps * train_flops(c.model, c.train.batch_size, c.model.context)


def _run_pool(members, index, jobs, progress, say, cache=None):
    """Runs each member's train process, `jobs` at a time; updates the index as they go."""
    env = child_env(jobs, cache)
    die_with_parent = _parent_death_signal()
    queue, running = list(members), {}
    last_report = time.time()
    with signals.Stop() as stop:
        while queue or running:
            while queue and len(running) < jobs and not stop.received:
                m = queue.pop(0)
                os.makedirs(m.workdir, exist_ok=True)
                log = open(os.path.join(m.workdir, "train.log"), "a")
                log.write(f"\n# {_now()} {shlex.join(m.command())}\n")
                log.flush()
                which = progress_lib.member_env(m.name, index.mine.index(m.name) + 1,
                                                len(index.mine))  # its bar says member k of N
                proc = subprocess.Popen(m.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env={**env, **which}, stdin=subprocess.DEVNULL,
                                        preexec_fn=die_with_parent)
                stop.children.append(proc)
                running[m.name] = (m, proc, time.time(), log)
                index.update(m.name, status="running", started=_now(), pid=proc.pid,
                             exit_code=None, error=None)
                resume = workdir_lib.newest_snapshot(m.workdir)
                say(f"[{m.name}] started ({m.config.train.steps} steps"
                    + (f", resuming at {resume}" if resume else "")
                    + f"; log {m.workdir}/train.log)")
            time.sleep(0.5)
            for name in list(running):
                m, proc, t0, log = running[name]
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                wall, step = time.time() - t0, workdir_lib.newest_snapshot(m.workdir)
                done = proc.returncode == 0 and finished(m)
                status = "done" if done else ("pending" if proc.returncode == 0 else "failed")
                error = None if proc.returncode == 0 else _last_line(log.name)
                index.update(name, status=status, exit_code=proc.returncode, last_step=step,
                             wall_s=round(wall, 1), ended=_now(), error=error, pid=None)
                if done:
                    say(f"[{name}] done in {wall:.0f} s (step {step})")
                elif status == "pending":
                    say(f"[{name}] stopped at step {step}; run the sweep again to resume")
                else:
                    say(f"[{name}] FAILED with exit code {proc.returncode} after {wall:.0f} s: "
                        f"{error or 'see ' + log.name}")
            if running and progress and time.time() - last_report > 60:
                last_report = time.time()
                say("running: " + ", ".join(
                    f"{n} step {workdir_lib.last_metrics_step(m.workdir) or 0}/{m.config.train.steps}"
                    for n, (m, *_) in running.items()))
    return stop.received


def _run_ensemble(group, index, progress, say) -> bool:
    """One group of compatible members in this process, through train.train_ensemble.
    Returns True if training stopped early without an error: a SIGTERM or SIGINT, which
    the training loop takes (it saves a snapshot and returns), so the sweep must stop too
    rather than start the next member."""
    from icl_jax import data, distributed, train
    distributed.maybe_initialize()
    names = [m.name for m in group]
    for m in group:
        index.update(m.name, status="running", started=_now(), exit_code=None, error=None)
    say(f"[{', '.join(names)}] training in this process"
        + (" as one ensemble" if len(group) > 1 else ""))
    t0 = time.time()
    try:
        if len(group) == 1:
            train.train_and_evaluate(group[0].config, group[0].workdir, progress=progress)
        else:
            train.train_ensemble([m.config for m in group], [m.workdir for m in group],
                                 progress=progress)
        error = None
    except (ConfigError, data.DataError, train.TrainingError, OSError) as e:
        error = e.args[0] if e.args else str(e)
    wall = time.time() - t0
    for m in group:
        ok = error is None and finished(m)
        status = "done" if ok else ("failed" if error else "pending")
        index.update(m.name, status=status, exit_code=None if error is None else 1,
                     last_step=workdir_lib.newest_snapshot(m.workdir), wall_s=round(wall, 1),
                     ended=_now(), error=error)
    stopped = error is None and not all(finished(m) for m in group)
    say(f"[{', '.join(names)}] " + (f"FAILED: {error}" if error else
                                    f"stopped after {wall:.0f} s" if stopped else
                                    f"done in {wall:.0f} s"))
    return stopped


# ----------------------------------------------------------------------------- the command

def run_sweep(spec: str, workdir: str, jobs: int = 1, analyze: bool = False,
              members: list[str] | None = None, ensemble: bool = False, dry_run: bool = False,
              overrides: dict | None = None, progress: bool = True,
              in_process: bool = False) -> dict:
    """Trains every (selected) member of the sweep `spec` in <workdir>/<name>; in_process:
    one after another in this process, without a process (and a jax start) per member.

    Returns the index (what sweep.json holds); with dry_run, prints the commands and
    starts nothing.
    """
    from icl_jax import distributed
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    multihost = distributed.requested() is not None
    if multihost and jobs > 1:
        raise ConfigError("--jobs must be 1 in a multi-host run: every member's processes "
                          "join the one coordinator in turn")
    selected = resolve(spec, workdir, overrides, members)  # every config error first

    def say(text):
        if progress and _process_id() == 0:
            print(text, file=sys.stderr, flush=True)

    todo = [m for m in selected if not finished(m)]
    groups, singles = [], list(todo)
    if ensemble:
        by_key = {}
        for m in todo:
            by_key.setdefault(ensemble_key(m.config), []).append(m)
        groups = [g for g in by_key.values() if len(g) > 1]
        singles = [m for g in by_key.values() if len(g) == 1 for m in g]
        if multihost:  # every member runs in this (distributed) process, one at a time
            groups += [[m] for m in singles]
            singles = []
    if in_process:
        groups, singles = groups + [[m] for m in singles], []
    if jobs > 1:  # longest first (the order is stable among equal costs)
        singles.sort(key=member_cost, reverse=True)

    if dry_run:
        for m in selected:
            if m not in todo:
                print(f"# {m.name}: finished (step {m.config.train.steps}), skipped")
        for g in groups:
            print(f"# ensemble {', '.join(m.name for m in g)}: one process, "
                  "icl_jax.train.train_ensemble(configs, workdirs)")
            for m in g:
                print("#   " + shlex.join(m.command()))
        if singles and jobs > 1:
            print(f"# {jobs} at a time, each with: XLA_FLAGS="
                  f"{shlex.quote(child_env(jobs).get('XLA_FLAGS', ''))}")
        for m in singles:
            print(shlex.join(m.command()))
        return {"members": {m.name: {"status": "done" if m not in todo else "pending",
                                     "command": shlex.join(m.command())} for m in selected}}

    index = Index(workdir, spec, selected)
    for m in selected:
        if m not in todo:
            index.data["members"][m.name].update(status="done", last_step=m.config.train.steps)
    index.write()
    say(f"sweep {spec}: {len(selected)} member(s), {len(selected) - len(todo)} already "
        f"finished; {len(todo)} to train ({jobs} at a time) in {workdir}")
    t0 = time.time()
    cache = compilation_cache()
    if groups:
        use_compilation_cache(cache)  # members trained in this process
    interrupted = None
    for g in groups:
        with progress_lib.member([m.name for m in g], [index.mine.index(m.name) + 1 for m in g],
                                 len(index.mine)):
            stopped = _run_ensemble(g, index, progress, say)
        if stopped:
            interrupted = "a signal"  # the rest stay pending; the same command resumes
            break
    if singles and not interrupted:
        interrupted = _run_pool(singles, index, jobs, progress, say, cache)

    states = {m.name: index.data["members"][m.name]["status"] for m in selected}
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "pending", "failed")}
    say(f"sweep: {counts['done']} done, {counts['pending']} pending, {counts['failed']} failed "
        f"in {time.time() - t0:.0f} s; index {index.path}"
        + (f" (stopped by {interrupted})" if interrupted else ""))
    if analyze and not interrupted:
        done = [m.workdir for m in selected if states[m.name] == "done"]
        if done:
            from icl_jax import analysis, report
            result = analysis.analyze(done, out=os.path.join(workdir, "analysis"),
                                      progress=progress)
            report.write_report(result, progress=progress)
            index.data["analysis"] = result["out"]
            index.write()
            say(f"analysis of {len(done)} member(s): {result['out']}/report.html")
        else:
            say("no finished member to analyse")
    return index.data

