"""How a transfer runs: its memory budget in bytes, the gate around the caller's arrays,
and fail-fast batches of jobs on a thread pool."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from cloudckpt.store import retry
from cloudckpt.store.retry import Abandoned

log = logging.getLogger("cloudckpt.blobs")

#: Memory charged per raw byte of a chunk in flight (see TransferOptions).
CHARGE = 2


class ByteBudget:
    """A counting semaphore in bytes; one oversized request may run alone. Once closed,
    every waiter wakes and no request is granted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.closed = False
        self._cond = threading.Condition()

    def acquire(self, n: int) -> bool:
        """Reserve ``n`` bytes, waiting for room; False (nothing reserved) once closed."""
        with self._cond:
            while not self.closed and self.used and self.used + n > self.limit:
                self._cond.wait()
            if self.closed:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Gate:
    """Work that touches the caller's memory (reading the arrays being saved, writing the
    arrays being loaded) runs inside; once closed, none starts, and ``close`` waits for
    the work inside, so nothing touches the caller's arrays after a transfer raised."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._open = True
        self._inside = 0

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        with self._cond:
            if not self._open:
                raise Abandoned("the transfer already failed; not touching its arrays")
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Shut; True once no work is inside (False if some still is after ``timeout``)."""
        with self._cond:
            self._open = False
            return self._cond.wait_for(lambda: self._inside == 0, timeout)


#: How long a failed transfer waits for its jobs to leave the caller's arrays (CPU work
#: of one chunk: decoding, hashing, a copy) before it raises anyway.
_GATE_WAIT = 60.0


class Batch:
    """The jobs of one save or load on a thread pool, stopped by the first failure.

    ``submit`` reserves each job's bytes from a budget (waiting for room) and queues it;
    ``results`` waits for all. The first job that fails for good (an exception that
    ``tolerate`` does not accept) stops the batch at once: no job is submitted or
    started after it, queued jobs are cancelled, waiters on the budget wake, the calls
    in flight give up at their next attempt (``retry.abandon_when``), nothing enters
    the ``gate`` again, and ``results`` raises that failure without waiting for the
    network calls in flight -- only for jobs inside the gate (bounded CPU work).
    """

    def __init__(
        self,
        workers: int,
        name: str,
        max_bytes: int | None = None,
        tolerate: Callable[[BaseException], bool] = lambda e: False,
    ) -> None:
        self.gate = Gate()
        self._budget = ByteBudget(max_bytes) if max_bytes is not None else None
        self._tolerate = tolerate
        self._pool = ThreadPoolExecutor(workers, name)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._failure: BaseException | None = None
        self._futures: dict[Any, Future[Any]] = {}

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if exc is None and not self._stop.is_set():
            self._pool.shutdown(wait=True)
        else:
            self._halt()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def submit(self, key: Any, cost: int, fn: Callable[..., Any], *args: Any) -> bool:
        """Queue ``fn(*args)`` once ``cost`` bytes of the budget are free; False (nothing
        queued) once the batch has stopped."""
        if self._stop.is_set():
            return False
        if self._budget is not None and not self._budget.acquire(cost):
            return False
        try:
            future = self._pool.submit(self._run, cost, fn, args)
        except BaseException:
            if self._budget is not None:
                self._budget.release(cost)
            raise
        self._futures[key] = future
        future.add_done_callback(self._settled)
        return True

    def results(self) -> dict[Any, Any]:
        """Key -> result (or the exception ``tolerate`` accepted) of every job, once all
        have finished; the first failure that was not tolerated is raised instead."""
        pending = set(self._futures.values())
        while pending and not self._stop.is_set():
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                self._settled(future)
        if self._stop.is_set():
            self._halt()
            assert self._failure is not None
            raise self._failure
        out: dict[Any, Any] = {}
        for key, future in self._futures.items():
            exc = future.exception()
            out[key] = future.result() if exc is None else exc
        return out

    def _run(self, cost: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            if self._stop.is_set():
                raise Abandoned("the transfer already failed")
            with retry.abandon_when(self._stop):
                return fn(*args)
        finally:
            if self._budget is not None:
                self._budget.release(cost)

    def _settled(self, future: Future[Any]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None or isinstance(exc, Abandoned) or self._tolerate(exc):
            return
        with self._lock:
            if self._failure is None:
                self._failure = exc
        self._stop.set()
        if self._budget is not None:
            self._budget.close()

    def _halt(self) -> None:
        """Stop: cancel what is queued, wake the budget's waiters, leave the network
        calls in flight behind, and wait only for the work inside the gate."""
        self._stop.set()
        if self._budget is not None:
            self._budget.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not self.gate.close(_GATE_WAIT):
            log.warning("a failed transfer's jobs still touch its arrays after %g s", _GATE_WAIT)
