"""Batches made ahead of the step in a background thread, so that reading the data and
copying it to the device overlap the running step.

A batch is a pure function of its step, so making it earlier changes nothing the step
sees: the order, and a resumed run's batches, are those of the synchronous loop.
"""
from __future__ import annotations

import queue
import threading

THREAD_NAME = "icl_jax-prefetch"
_POLL_S = 0.1  # how often a blocked producer looks for close()


class Prefetcher:
    """get_batch(step) for step = start, start + 1, ... < stop, made `depth` steps ahead.

    get(step) returns that step's batch (steps must be asked for in order); an exception
    raised while making a batch is raised again by the get() of its step, so it surfaces
    where the synchronous loop would have raised it. close() stops and joins the thread;
    use it as a context manager.
    """

    def __init__(self, get_batch, start: int, stop: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self._get_batch, self._next, self._stop_step = get_batch, start, stop
        self._queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start,), name=THREAD_NAME,
                                        daemon=True)
        self._thread.start()

    def _produce(self, step):
        while step < self._stop_step and not self._closed.is_set():
            try:
                item = (step, self._get_batch(step), None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                item = (step, None, err)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def get(self, step: int):
        if step != self._next:
            raise ValueError(f"prefetcher asked for step {step}, but step {self._next} is next")
        if self._closed.is_set():
            raise RuntimeError("prefetcher is closed")
        while True:
            try:
                got, batch, err = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"prefetcher has no batch for step {step} (it stops "
                                       f"before step {self._stop_step})") from None
        if err is not None:
            self.close()
            raise err
        self._next = got + 1
        return batch

    def close(self):
        """Stops the thread and drops the batches it made ahead; idempotent."""
        self._closed.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting to put
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        while not self._queue.empty():
            self._queue.get_nowait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
