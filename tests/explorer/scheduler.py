"""The baton scheduler: every store call of an actor waits for its turn, one at a time."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .clock import local, real_monotonic
from .model import READ_ONLY, SLEEP, START, Killed, store_methods


@dataclass
class _Request:
    method: str
    key: str
    granted: bool = False


@dataclass
class _Actor:
    name: str
    kill_op: int | None = None
    thread: threading.Thread | None = None
    waiting: list[_Request] = field(default_factory=list)
    inflight: int = 0
    done: bool = False
    killed: bool = False
    frozen_until: int = -1
    ops: int = 0
    last_write: int = -1
    wake_at: float = 0.0

    @property
    def quiet(self) -> bool:
        return self.done or (bool(self.waiting) and self.inflight == 0)


class Scheduler:
    """Runs actor threads one store call at a time, in the order a chooser picks."""

    def __init__(self, step_timeout: float, deadline: float) -> None:
        self.cond = threading.Condition()
        self.actors: dict[str, _Actor] = {}
        self.step = 0
        self.writes = 0
        #: Seconds on the virtual clock since the schedule began (``monotonic`` is ``t0 +
        #: vnow``): it moves only when every actor left is asleep, to the earliest wake-up;
        #: steps take no time on it, so a schedule does not depend on how fast it ran.
        self.t0 = real_monotonic()
        self.vnow = 0.0
        self.aborted = False
        self.step_timeout = step_timeout
        self.deadline = deadline

    # the actor side
    def wrap(self, store: Any, actor: str) -> list[str]:
        """Make every public method of ``store`` a scheduled step of ``actor``."""
        names = store_methods(type(store))
        for name in names:
            setattr(store, name, self._wrapped(self.actors[actor], name, getattr(store, name)))
        return names

    def _wrapped(self, actor: _Actor, method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(local, "depth", 0)
            if depth:  # a store method calling another: one step
                return fn(*args, **kwargs)
            self._wait_turn(actor, method, _key_of(args, kwargs))
            local.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                local.depth = 0
                with self.cond:
                    actor.inflight -= 1
                    self.cond.notify_all()

        return call

    def _wait_turn(self, actor: _Actor, method: str, key: str) -> None:
        with self.cond:
            if actor.kill_op is not None and actor.ops >= actor.kill_op:
                actor.killed = True
            if actor.killed or self.aborted:
                raise Killed
            request = _Request(method, key)
            actor.waiting.append(request)
            self.cond.notify_all()
            while not request.granted:
                if actor.killed or self.aborted or real_monotonic() > self.deadline:
                    actor.waiting.remove(request)
                    self.cond.notify_all()
                    raise Killed
                self.cond.wait(1.0)

    # the scheduling side
    def add(self, name: str, kill_op: int | None) -> None:
        self.actors[name] = _Actor(name, kill_op)

    def start(self, name: str, body: Callable[[], None]) -> bool:
        """Start an actor's thread; it waits for its first step, ``start`` (so that what
        it does before its first store call, e.g. reading the clock, is scheduled too).
        False if it does not get there."""
        actor = self.actors[name]

        def run() -> None:
            local.actor, local.sched = actor, self
            try:
                self._wait_turn(actor, START, "")
                with self.cond:
                    actor.inflight -= 1
                body()
            except Killed:
                pass
            finally:
                with self.cond:
                    actor.done = True
                    self.cond.notify_all()

        actor.thread = threading.Thread(target=run, name=f"sched-{name}", daemon=True)
        actor.thread.start()
        return self._settle(actor)

    def _settle(self, actor: _Actor) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: actor.quiet, self.step_timeout)

    def sleep(self, actor: _Actor, seconds: float) -> None:
        """An actor's ``time.sleep``: wait for its wake-up step on the virtual clock."""
        with self.cond:
            actor.wake_at = self.vnow + max(0.0, seconds)
        self._wait_turn(actor, SLEEP, f"{seconds:.3g}s")
        with self.cond:
            actor.inflight -= 1
            self.cond.notify_all()

    def enabled(self) -> list[_Actor]:
        """The actors that may take the next step: waiting, not frozen, awake. When there
        are none, the virtual clock moves to the next wake-up, or the frozen thaw."""
        for _ in range(3):
            live = [a for a in self.actors.values() if not a.done and a.waiting]
            thawed = [a for a in live if a.frozen_until <= self.step]
            ready = [a for a in thawed if a.waiting[0].method != SLEEP or a.wake_at <= self.vnow]
            if ready or not live:
                return ready
            sleepers = [a.wake_at for a in thawed if a.waiting[0].method == SLEEP]
            if sleepers:
                self.vnow = max(self.vnow, min(sleepers))
            else:  # everyone left is frozen: their time is up
                for a in live:
                    a.frozen_until = self.step
        return []

    def grant(self, name: str) -> tuple[_Request, bool]:
        """Run one store call of ``name``; returns it and whether the actor settled."""
        actor = self.actors[name]
        with self.cond:
            request = actor.waiting.pop(0)
            request.granted = True
            actor.inflight += 1
            actor.ops += 1
            if request.method not in READ_ONLY:
                actor.last_write = self.step
                self.writes += 1
            self.step += 1
            self.cond.notify_all()
        return request, self._settle(actor)

    def kill(self, name: str) -> bool:
        actor = self.actors[name]
        with self.cond:
            actor.killed = True
            self.cond.notify_all()
            return self.cond.wait_for(lambda: actor.done, self.step_timeout)

    def abort(self, join: float) -> list[str]:
        """Stop every actor (their next store call raises); names of those still alive."""
        with self.cond:
            self.aborted = True
            self.cond.notify_all()
        end = real_monotonic() + join
        for actor in self.actors.values():
            if actor.thread is not None:
                actor.thread.join(max(0.0, end - real_monotonic()))
        return [a.name for a in self.actors.values() if a.thread and a.thread.is_alive()]


def _key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    first = args[0] if args else next(iter(kwargs.values()), "")
    if isinstance(first, str):
        return first
    if isinstance(first, (list, tuple, set, frozenset)):
        keys = sorted(str(k) for k in first)
        return f"{keys[0]} +{len(keys) - 1}" if len(keys) > 1 else (keys[0] if keys else "")
    return "" if first == "" else type(first).__name__
