"""SIGTERM and SIGINT as a request to stop: the one trap that training and sweeps share.

    with signals.Stop() as stop:      # the handlers are restored on leaving the block
        ...                           # stop.received: None, or the signal's name
        stop.children.append(proc)    # processes told in turn (SIGTERM: they snapshot)

The training loop polls `received`, saves a snapshot at the step it is on and exits; a sweep
starts no new member, passes SIGTERM on to the members' processes and waits for them.
"""
from __future__ import annotations

import signal


class Stop:
    """SIGTERM / SIGINT inside the block set `received` (the signal's name) and pass SIGTERM
    on to every child process still running; outside the main thread, where Python cannot
    install handlers, signals are left alone."""

    def __init__(self):
        self.received: str | None = None
        self.children = []  # subprocess.Popen of processes to pass a stop on to
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
        for p in self.children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
