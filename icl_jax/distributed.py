"""Joining a multi-host run: jax.distributed.initialize from the environment, never hanging.

The environment asks for several processes in one of three ways:
  ICL_JAX_COORDINATOR (or JAX_COORDINATOR_ADDRESS)=host:port with
      ICL_JAX_NUM_PROCESSES and ICL_JAX_PROCESS_ID (or SLURM's SLURM_NTASKS, SLURM_PROCID);
  ICL_JAX_DISTRIBUTED=1 alone: jax detects the cluster itself (Cloud TPU pod slices, SLURM).
ICL_JAX_DISTRIBUTED=0 turns all of this off; ICL_JAX_INIT_TIMEOUT (seconds, default 300)
bounds how long a process waits for the others.

A process that cannot join within the timeout exits with status 2 and one line that
names the coordinator, its process id and count and the timeout. jax itself aborts
the process (SIGABRT, with a C++ stack) when its own deadline passes, so a watchdog
thread gives up a few seconds before jax's deadline.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time

DEFAULT_TIMEOUT_S = 300
_GRACE_S = 10  # jax's own deadline is this much later than ours, so ours always fires first


class DistributedError(RuntimeError):
    """The process could not join the multi-host run; the message says how to fix it."""


def _env(*names):
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return name, value
    return None, None


def _int_env(names, what):
    name, value = _env(*names)
    if name is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} must be an integer "
                               f"({what})") from None


def requested() -> dict | None:
    """What the environment asks for: {"coordinator", "num_processes", "process_id"}
    (None where jax should detect it), or None for a single process."""
    if os.environ.get("ICL_JAX_DISTRIBUTED", "").lower() in ("0", "false", "no"):
        return None
    auto = os.environ.get("ICL_JAX_DISTRIBUTED", "").lower() in ("1", "true", "yes")
    _, coordinator = _env("ICL_JAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS")
    if coordinator is None:
        return {"coordinator": None, "num_processes": None, "process_id": None} if auto else None
    n = _int_env(("ICL_JAX_NUM_PROCESSES", "JAX_NUM_PROCESSES", "SLURM_NTASKS"),
                 "the number of processes")
    i = _int_env(("ICL_JAX_PROCESS_ID", "JAX_PROCESS_ID", "SLURM_PROCID"), "this process's id")
    if n is None or i is None:
        raise DistributedError(f"coordinator {coordinator} is set but the "
                               f"{'process count' if n is None else 'process id'} is not; set "
                               "ICL_JAX_NUM_PROCESSES and ICL_JAX_PROCESS_ID (or run under srun)")
    if n < 1 or not 0 <= i < n:
        raise DistributedError(f"process id {i} must lie in 0..{n - 1} "
                               f"(ICL_JAX_PROCESS_ID, ICL_JAX_NUM_PROCESSES)")
    if n == 1:
        return None
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address {coordinator!r} must be host:port "
                               "(ICL_JAX_COORDINATOR)")
    return {"coordinator": coordinator, "num_processes": n, "process_id": i}


def env_process_id() -> int:
    """This process's id as the environment gives it, without initializing anything."""
    _, value = _env("ICL_JAX_PROCESS_ID", "JAX_PROCESS_ID", "SLURM_PROCID", "TPU_WORKER_ID",
                    "CLOUD_TPU_TASK_ID")
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def init_timeout_s(timeout_s=None) -> int:
    if timeout_s is not None:
        return int(timeout_s)
    value = os.environ.get("ICL_JAX_INIT_TIMEOUT", "")
    try:
        return int(float(value)) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"ICL_JAX_INIT_TIMEOUT={value!r} must be a number of seconds") \
            from None


def _describe(req, timeout_s):
    if req["coordinator"] is None:
        return (f"could not join the auto-detected multi-host run (ICL_JAX_DISTRIBUTED=1) "
                f"within {timeout_s} s; check that every worker runs the same command, or set "
                "ICL_JAX_COORDINATOR, ICL_JAX_NUM_PROCESSES and ICL_JAX_PROCESS_ID")
    return (f"could not join the multi-host run at coordinator {req['coordinator']} as process "
            f"{req['process_id']} of {req['num_processes']} within {timeout_s} s; check that "
            f"process 0 runs on that host and port and that all {req['num_processes']} "
            "processes start with the same ICL_JAX_COORDINATOR and ICL_JAX_NUM_PROCESSES "
            "(raise ICL_JAX_INIT_TIMEOUT if they start far apart)")


def _wait_for_port(address: str, deadline: float) -> bool:
    host, _, port = address.rpartition(":")
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def maybe_initialize(timeout_s=None) -> bool:
    """Calls jax.distributed.initialize when the environment asks for several processes.

    Returns True if it did. Raises DistributedError for a malformed environment or a
    coordinator that never appears; a process that connects but whose peers never
    come exits with status 2 after `timeout_s` (env ICL_JAX_INIT_TIMEOUT, default 300).
    """
    req = requested()
    if req is None:
        return False
    timeout_s = init_timeout_s(timeout_s)
    deadline = time.monotonic() + timeout_s

    import jax
    if jax.distributed.is_initialized():
        return True
    try:  # CPU hosts need a collectives backend for cross-process psum; gloo ships with jaxlib
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass

    # A worker first waits for the coordinator to listen: a clean error if it never does.
    if req["coordinator"] is not None and req["process_id"] != 0:
        if not _wait_for_port(req["coordinator"], deadline):
            raise DistributedError(_describe(req, timeout_s))

    def give_up():
        print(f"error: {_describe(req, timeout_s)}", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.1), give_up)
    watchdog.daemon = True
    watchdog.start()
    kwargs = {"initialization_timeout": timeout_s + _GRACE_S}
    if req["coordinator"] is not None:
        kwargs.update(coordinator_address=req["coordinator"],
                      num_processes=req["num_processes"], process_id=req["process_id"])
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:  # a bad address, no cluster detected, ...
        raise DistributedError(f"{_describe(req, timeout_s).split(';')[0]}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    finally:
        watchdog.cancel()
    return True
