"""Saving in the background: one upload in flight on one worker thread, from a snapshot
of the state in reused host buffers, its error raised to the caller, never swallowed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from cloudckpt.results import SaveReport
from cloudckpt.snapshot import Snapshotter
from cloudckpt.versions import Version

log = logging.getLogger("cloudckpt")

T = TypeVar("T")

WhenBusy = Literal["wait", "skip"]


@dataclass
class SaveJob:
    """A save on its way: what to record once it is committed."""

    reason: str
    step: int
    metrics: dict[str, float]
    meta: dict[str, Any]
    #: ``time.perf_counter()`` when the save was asked for.
    started: float
    #: Seconds the training loop was blocked (the snapshot); None for a synchronous save.
    blocked: float | None = None
    #: False: a save to the local tier only (see :class:`~cloudckpt.LocalTier`).
    to_bucket: bool = True

    def report(self, version: Version) -> SaveReport:
        """What the committed save cost, logged at INFO."""
        seconds = time.perf_counter() - self.started
        blocked = seconds if self.blocked is None else self.blocked
        log.info(
            "saved step %d (%s) as %s%s: %.1f MB logical, %.1f MB stored, %.1f MB uploaded, "
            "%.2fs, training blocked %.2fs",
            self.step,
            self.reason,
            version.id,
            "" if self.to_bucket else " in the local tier",
            version.logical_bytes / 1e6,
            version.stored_bytes / 1e6,
            version.uploaded_bytes / 1e6,
            seconds,
            blocked,
        )
        return SaveReport(
            version,
            self.reason,
            version.logical_bytes,
            version.stored_bytes,
            version.uploaded_bytes,
            seconds,
            blocked,
            "bucket" if self.to_bucket else "local",
        )


class BackgroundSaver(Generic[T]):
    """At most one save in flight, run on a worker thread of its own.

    ``snapshot`` copies a state into host buffers reused from save to save, so it may
    only run while no save is in flight (the buffers are the upload's input); ``submit``
    starts the upload. A save that ended with an error raises it from ``wait`` or
    ``collect``. ``when_busy`` says what a new save does while one is in flight: wait for
    it, or be skipped.
    """

    def __init__(self, thread_name: str, when_busy: WhenBusy = "wait") -> None:
        if when_busy not in ("wait", "skip"):
            raise ValueError(f"when_busy must be 'wait' or 'skip', not {when_busy!r}")
        self.thread_name = thread_name
        self.when_busy: WhenBusy = when_busy
        self._snapshots = Snapshotter()
        self._pool: ThreadPoolExecutor | None = None
        #: The save in flight, or one that ended and was not collected yet.
        self.inflight: Future[T] | None = None

    @property
    def running(self) -> bool:
        """A save is still running."""
        return self.inflight is not None and not self.inflight.done()

    @property
    def failed(self) -> bool:
        """The save that ran ended with an error nobody collected yet."""
        fut = self.inflight
        return fut is not None and fut.done() and fut.exception() is not None

    def make_room(self, busy: bool, *, may_skip: bool = True) -> bool:
        """Before a new save: False to skip it (``busy``, ``when_busy="skip"`` and
        ``may_skip``), else wait for the save in flight (raising its error) and True.

        ``busy`` is passed in because several ranks agree on it before any of them waits.
        """
        if busy and self.when_busy == "skip" and may_skip:
            return False
        if busy:
            self.wait()
        return True

    def snapshot(self, state: Any) -> Any:
        """A consistent host copy of ``state`` in the reused buffers."""
        if self.running:
            raise RuntimeError("a save is in flight: its buffers cannot be reused yet")
        return self._snapshots.copy(state)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the worker thread (a previous save must have ended)."""
        if self.running:
            raise RuntimeError("a save is in flight: wait() for it first")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.thread_name)
        self.inflight = self._pool.submit(fn, *args)
        return self.inflight

    def wait(self) -> T | None:
        """Block until the save in flight (if any) ended: its result, or its error."""
        inflight, self.inflight = self.inflight, None
        return None if inflight is None else inflight.result()

    def collect(self) -> None:
        """Raise the error of a save that ended (nothing while one is still running)."""
        if self.inflight is not None and self.inflight.done():
            self.wait()

    def close(self) -> None:
        """Wait for the save in flight (raising its error), then stop the worker thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
