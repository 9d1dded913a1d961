"""The virtual clock: inside cloudckpt, ``time.sleep`` is a scheduled wake-up and
``time.monotonic`` moves only when every actor left is asleep."""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scheduler import Scheduler

#: Per thread: its actor and scheduler, and ``depth`` (1 inside a granted store call).
local = threading.local()
_real_sleep = time.sleep
#: The real ``time.monotonic`` (for bounds and timeouts; cloudckpt sees the virtual one).
real_monotonic = time.monotonic
_current: Scheduler | None = None


class _Clock:
    """Stands in for the ``time`` module inside cloudckpt while a schedule runs: an
    actor's ``sleep`` is a scheduled wake-up and ``monotonic`` reads the virtual clock
    (the world is paused while an actor sleeps, so real sleeping would only waste time).
    ``time.time`` stays real: object times on the store are real too."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        actor, sched = getattr(local, "actor", None), getattr(local, "sched", None)
        if actor is None or sched is None or sched is not _current or getattr(local, "depth", 0):
            _real_sleep(seconds)
        else:
            sched.sleep(actor, seconds)

    @staticmethod
    def monotonic() -> float:
        sched = _current
        return real_monotonic() if sched is None else sched.t0 + sched.vnow


@contextlib.contextmanager
def virtual_clock(sched: Scheduler, seed: int) -> Iterator[None]:
    """Give every loaded ``cloudckpt`` module the virtual clock of ``sched``, and seed
    the ``random`` module (retry backoffs draw from it: their lengths order wake-ups)."""
    global _current
    if _current is not None:
        raise RuntimeError("one schedule at a time per process")
    saved = random.getstate()
    random.seed(seed)
    clock = _Clock()
    patched = [
        m
        for name, m in list(sys.modules.items())
        if name.split(".")[0] == "cloudckpt" and getattr(m, "time", None) is time
    ]
    for m in patched:
        m.time = clock  # type: ignore[attr-defined]
    _current = sched
    try:
        yield
    finally:
        _current = None
        random.setstate(saved)
        for m in patched:
            m.time = time  # type: ignore[attr-defined]
