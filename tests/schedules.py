"""A deterministic schedule explorer for the commit protocol.

Actors (commits, lease holders, garbage collections, repairs, retention) run in threads,
each with its own :class:`~cloudckpt.Repo` handle on one repository. Every public method
of each handle's :class:`~cloudckpt.store.Store` (found by inspection, so new ones are
covered) is wrapped so that the calling actor blocks until the scheduler grants it one
step; the call then runs to completion and the actor runs on until its next store call.
An actor's start is a step too (what it does before its first call, such as reading the
clock, happens when it is scheduled), and so is waking from ``time.sleep``: inside
cloudckpt, sleeps and ``time.monotonic`` run on a virtual clock that moves only when
every actor left is asleep. One actor runs at a time, so a schedule is a deterministic
sequence of ``(actor, operation, key)`` steps. After every step a checker reads the
repository through an unwrapped handle (the world is paused) and checks:

- **I1** no acknowledged loss: every acknowledged version not deleted by a retention
  actor is in ``versions.json``, its manifest and blobs are stored, and it loads
  bit-exact and verifies (re-checked whenever an object it reads changed);
- **I2** heads move forward: a branch head is the previous head or a descendant of it;
- **I3** fencing: once a lease holder was superseded (another actor's acquire made its
  last write), none of the old holder's commits takes effect afterwards -- a commit takes
  effect at the step after which its version is first in the index; one that took
  effect earlier may return later -- and none of its versions descends from the new
  holder's;
- **I4** repair only restores: every version in the index was acknowledged or committed
  by an actor killed mid-commit; a commit that raised never appears in the index;
- **I5** every garbage collection returns normally (SweepExpired is accepted only from a
  collection that was not scheduled for longer than its sweep may last);
- **hang**: a step, an actor or a schedule that runs past its bound; **error**: any
  other unexpected exception in an actor.

Schedules are enumerated exhaustively (a depth-first search with sleep sets -- two reads
commute, anything else is explored in both orders -- and a growing preemption bound) or
drawn at random from a seed, with optional *kills* (the actor's next store call raises
:class:`Killed`, a BaseException, so nothing of it runs after that) and *freezes* (the
actor is not scheduled for K steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cloudckpt import errors
from cloudckpt.blobs import TransferOptions, blob_key, iter_chunks
from cloudckpt.lease import WriterLease
from cloudckpt.repo import Repo, RepoOptions

log = logging.getLogger("cloudckpt.schedules")

#: The first step of every actor: it runs until its first store call.
START = "start"
#: The step that ends an actor's ``time.sleep`` (on the virtual clock).
SLEEP = "sleep"
#: Store methods that only read, an actor's start and its waking up (they touch no object):
#: two of these commute (the basis of the sleep sets).
READ_ONLY = frozenset(
    {"get", "get_buffer", "get_range", "stat", "read_versioned", "list_keys", "list_info"}
    | {START, SLEEP}
)
#: Public Store methods that only compute a name and touch nothing: not a step.
LOCAL_METHODS = frozenset({"path", "url"})
#: One blob pack per dtype: ``w`` and ``noise`` share a new float32 pack per commit, the
#: int64 ``shared`` tensor is the same blob in every commit (deduplicated).
SHARED = torch.arange(16, dtype=torch.int64)
#: Transfers on one worker thread: an actor makes at most one store call at a time.
OPTIONS = RepoOptions(transfer=TransferOptions(workers=1))


class Killed(BaseException):
    """Raised in an actor at its next store call once it is killed (SIGKILL)."""


# -- feature detection --------------------------------------------------------------------
@dataclass(frozen=True)
class Features:
    """What the library under test offers for fencing."""

    fence: bool  #: ``Repo.commit(fence=...)``
    force: bool  #: ``WriterLease.acquire(force=...)``
    fenced_out: type[BaseException] | None  #: ``errors.FencedOut``

    @property
    def fencing(self) -> bool:
        return self.fence and self.force


def features() -> Features:
    """Inspect today's API: fencing actors run only where it is there."""
    fence = "fence" in inspect.signature(Repo.commit).parameters
    force = "force" in inspect.signature(WriterLease.acquire).parameters
    fenced_out = getattr(errors, "FencedOut", None)
    return Features(fence, force, fenced_out if isinstance(fenced_out, type) else None)


def rejections() -> tuple[type[BaseException], ...]:
    """The exceptions a refused commit raises (a documented, clean refusal)."""
    found: list[type[BaseException]] = [errors.CommitConflict, errors.LeaseHeld]
    fenced_out = features().fenced_out
    if fenced_out is not None:
        found.append(fenced_out)
    return tuple(found)


def store_methods(store_type: type) -> list[str]:
    """The public methods of a Store class that reach the store (each one is a step)."""
    return sorted(
        name
        for name, _ in inspect.getmembers(store_type, callable)
        if not name.startswith("_")
        and name not in LOCAL_METHODS
        and not isinstance(inspect.getattr_static(store_type, name), (type, property))
    )


# -- schedules ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One granted store call."""

    index: int
    actor: str
    method: str
    key: str

    def __str__(self) -> str:
        return f"{self.index}:{self.actor}.{self.method}({self.key})"


@dataclass(frozen=True)
class Kill:
    """Kill ``actor`` before global step ``step``, or before its own ``op``-th call."""

    actor: str
    step: int | None = None
    op: int | None = None

    def __str__(self) -> str:
        return f"kill {self.actor}@" + (f"{self.step}" if self.op is None else f"op{self.op}")


@dataclass(frozen=True)
class Freeze:
    """Do not schedule ``actor`` for ``steps`` steps from global step ``step``."""

    actor: str
    step: int
    steps: int

    def __str__(self) -> str:
        return f"freeze {self.actor}@{self.step}+{self.steps}"


@dataclass(frozen=True)
class Violation:
    """An invariant broken at a step (``subject`` deduplicates reports)."""

    invariant: str
    step: int
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.invariant} at step {self.step}: {self.message}"


class Chooser(Protocol):
    """Picks the actor to run next among the enabled ones (None: stop this schedule)."""

    def choose(self, enabled: Sequence[str], ops: dict[str, str]) -> str | None: ...


class RandomChooser:
    """A seeded uniform choice at every step."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def choose(self, enabled: Sequence[str], ops: dict[str, str]) -> str | None:
        return enabled[self.rng.randrange(len(enabled))]


class ScriptChooser:
    """Replays a list of actor names; then the first enabled actor."""

    def __init__(self, script: Sequence[str]) -> None:
        self.script, self.at = list(script), 0

    def choose(self, enabled: Sequence[str], ops: dict[str, str]) -> str | None:
        want = self.script[self.at] if self.at < len(self.script) else None
        self.at += 1
        return want if want in enabled else enabled[0]


# -- what actors record -------------------------------------------------------------------
@dataclass
class Attempt:
    """One commit by an actor: its state, and how it ended."""

    token: str
    actor: str
    branch: str
    state: dict[str, Any]
    #: inflight | acked | rejected | error | killed
    status: str = "inflight"
    vid: str | None = None
    error: str = ""


@dataclass(frozen=True)
class Acquisition:
    """A writer lease taken by ``actor`` on ``branch``, its last write at ``step``."""

    actor: str
    branch: str
    step: int


@dataclass
class Records:
    """Everything actors report, read by the checker between steps."""

    attempts: dict[str, Attempt] = field(default_factory=dict)
    acquisitions: list[Acquisition] = field(default_factory=list)
    #: Version id -> retention actor that is deleting or deleted it.
    deleting: dict[str, str] = field(default_factory=dict)
    #: (invariant, actor, message, step) of actor failures (I5, error).
    failures: list[tuple[str, str, str, int]] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)


def make_state(k: int, salt: int) -> dict[str, Any]:
    """A small state, distinct for every ``k`` (and random per ``salt``)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{salt}:{k}".encode()))
    return {
        "w": torch.full((64,), float(k)),
        "shared": SHARED.clone(),
        "noise": torch.rand(8, generator=gen),
        "step": k,
    }


def same_state(a: Any, b: Any) -> bool:
    """Bit-exact equality of two states (tensors: dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:240]}"


# -- the scheduler ------------------------------------------------------------------------
_local = threading.local()
_real_sleep = time.sleep
_real_monotonic = time.monotonic
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
        actor, sched = getattr(_local, "actor", None), getattr(_local, "sched", None)
        if actor is None or sched is None or sched is not _current or getattr(_local, "depth", 0):
            _real_sleep(seconds)
        else:
            sched.sleep(actor, seconds)

    @staticmethod
    def monotonic() -> float:
        sched = _current
        return _real_monotonic() if sched is None else sched.t0 + sched.vnow


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
        self.t0 = _real_monotonic()
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
            depth = getattr(_local, "depth", 0)
            if depth:  # a store method calling another: one step
                return fn(*args, **kwargs)
            self._wait_turn(actor, method, _key_of(args, kwargs))
            _local.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                _local.depth = 0
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
                if actor.killed or self.aborted or _real_monotonic() > self.deadline:
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
            _local.actor, _local.sched = actor, self
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
        end = _real_monotonic() + join
        for actor in self.actors.values():
            if actor.thread is not None:
                actor.thread.join(max(0.0, end - _real_monotonic()))
        return [a.name for a in self.actors.values() if a.thread and a.thread.is_alive()]


def _key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    first = args[0] if args else next(iter(kwargs.values()), "")
    if isinstance(first, str):
        return first
    if isinstance(first, (list, tuple, set, frozenset)):
        keys = sorted(str(k) for k in first)
        return f"{keys[0]} +{len(keys) - 1}" if len(keys) > 1 else (keys[0] if keys else "")
    return "" if first == "" else type(first).__name__


# -- actors -------------------------------------------------------------------------------
@dataclass
class Ctx:
    """What an actor body gets: its name, its (wrapped) repo, and where to report."""

    name: str
    repo: Repo
    records: Records
    sched: Scheduler
    salt: int
    base: int
    feats: Features
    leases: list[WriterLease]

    def last_write(self) -> int:
        return self.sched.actors[self.name].last_write

    def now(self) -> int:
        return self.sched.step

    def sleep(self, seconds: float) -> None:
        """Sleep on the virtual clock (the others run meanwhile)."""
        self.sched.sleep(self.sched.actors[self.name], seconds)

    def fail(self, invariant: str, message: str) -> None:
        self.records.failures.append((invariant, self.name, message, self.now()))


@dataclass(frozen=True)
class ActorSpec:
    """A named actor: ``run`` is its body, ``kind`` what it is (for reports)."""

    name: str
    kind: str
    run: Callable[[Ctx], None]


_NO_FENCE = object()


def _commit(
    ctx: Ctx,
    branch: str,
    k: int,
    *,
    fence: Any = _NO_FENCE,
    fast_forward: bool = False,
    before: Callable[[], None] | None = None,
) -> bool:
    """Commit state ``k`` and record the outcome; True if acknowledged."""
    token = f"{ctx.name}#{k}"
    state = make_state(k, ctx.salt)
    attempt = ctx.records.attempts[token] = Attempt(token, ctx.name, branch, state)
    kwargs: dict[str, Any] = {"fast_forward": True} if fast_forward else {}
    if fence is not _NO_FENCE:
        kwargs["fence"] = fence
    try:
        if before is not None:
            before()
        version = ctx.repo.commit(
            state, branch=branch, step=k, meta={"writer": ctx.name, "attempt": token}, **kwargs
        )
    except Killed:
        attempt.status = "killed"
        raise
    except rejections() as e:
        attempt.status, attempt.error = "rejected", _short(e)
    except Exception as e:
        attempt.status, attempt.error = "error", _short(e)
        ctx.fail("error", f"commit {token} raised {_short(e)}")
    else:
        attempt.status, attempt.vid = "acked", version.id
    return attempt.status == "acked"


def committer(name: str, branch: str = "main", n: int = 2, fast_forward: bool = False) -> ActorSpec:
    """Commits ``n`` states to ``branch`` (``fast_forward``: on top of a moved head)."""

    def run(ctx: Ctx) -> None:
        for i in range(n):
            _commit(ctx, branch, ctx.base + i, fast_forward=fast_forward)

    return ActorSpec(name, "commit", run)


def lease_holder(
    name: str,
    branch: str = "main",
    n: int = 2,
    force: bool = False,
    pause: float = 0.0,
    guard: bool = True,
) -> ActorSpec:
    """Takes the branch's writer lease (``force``: an operator's takeover), sleeps
    ``pause`` seconds (a slow job), then commits.

    With fencing (``fence=``, ``force=``) each actor is a machine of its own and commits
    carry ``lease.fence``. Without it (the protocol before fencing, as CheckpointManager
    did) each commit is preceded by ``lease.check()``; the actors are managers of one
    process, so a later acquire takes the lease over. ``guard=False`` commits with
    neither: a misbehaving job (the checker's own tests).
    """

    def run(ctx: Ctx) -> None:
        fencing = ctx.feats.fencing
        lease = WriterLease(ctx.repo.store, branch, ttl=3600)
        ctx.leases.append(lease)
        me = getattr(lease, "me", None)
        if fencing and dataclasses.is_dataclass(me) and hasattr(me, "host"):
            lease.me = dataclasses.replace(me, host=f"host-{name}")  # type: ignore[type-var]
        try:
            if fencing and force:
                lease.acquire(force=True)  # type: ignore[call-arg]
            else:
                lease.acquire()
        except Killed:
            raise
        except rejections() as e:
            ctx.records.outcomes[name] = f"lease refused: {_short(e)}"
            return
        ctx.records.acquisitions.append(Acquisition(name, branch, ctx.last_write()))
        if pause:
            ctx.sleep(pause)
        for i in range(n):
            if not guard:
                ok = _commit(ctx, branch, ctx.base + i)
            elif fencing:
                ok = _commit(ctx, branch, ctx.base + i, fence=lease.fence)  # type: ignore[attr-defined]
            else:
                ok = _commit(ctx, branch, ctx.base + i, before=lease.check)
            if not ok:
                return  # fenced out or refused: a job stops here

    return ActorSpec(name, "takeover" if force else "lease", run)


def gc_actor(name: str, grace: float = 0.0) -> ActorSpec:
    """``repo.gc(grace)``; any exception breaks I5."""

    def run(ctx: Ctx) -> None:
        began = ctx.sched.vnow
        try:
            report = ctx.repo.gc(grace=grace)
        except Killed:
            raise
        except Exception as e:
            ctx.records.outcomes[name] = f"raised {_short(e)}"
            if not _starved(e, ctx.sched.vnow - began):
                ctx.fail("I5", f"gc raised {_short(e)}")
        else:
            ctx.records.outcomes[name] = f"swept {len(report.manifests)}m {len(report.blobs)}b"

    return ActorSpec(name, "gc", run)


def _starved(e: Exception, waited: float) -> bool:
    """A collection that stopped because it was not scheduled for longer than its sweep
    may last (SweepExpired): the designed answer to a frozen process, not a failure."""
    import cloudckpt.gc as gc

    expired = getattr(errors, "SweepExpired", None)
    ttl = float(getattr(gc, "SWEEP_TTL", 0.0))
    return expired is not None and isinstance(e, expired) and waited >= ttl * 2 / 3


def repair_actor(name: str) -> ActorSpec:
    """``repo.repair()``."""

    def run(ctx: Ctx) -> None:
        try:
            index = ctx.repo.repair()
            ctx.records.outcomes[name] = f"repaired: {len(index.versions)} versions"
        except Killed:
            raise
        except errors.CommitConflict as e:  # lost races: refused, not wrong
            ctx.records.outcomes[name] = f"refused: {_short(e)}"
        except Exception as e:
            ctx.fail("error", f"repair raised {_short(e)}")

    return ActorSpec(name, "repair", run)


def retention_actor(name: str, rounds: int = 2) -> ActorSpec:
    """Deletes the oldest version that is neither a branch head nor tagged, ``rounds``
    times (a version it asked to delete is excused from I1)."""

    def run(ctx: Ctx) -> None:
        for _ in range(rounds):
            index = ctx.repo.index()
            pinned = {*index.branches.values(), *index.tags.values()}
            victims = [v for v in index.versions if v not in pinned][:1]
            if not victims:
                continue
            for vid in victims:
                ctx.records.deleting.setdefault(vid, name)
            try:
                ctx.repo.delete(victims)
                ctx.records.outcomes[name] = f"deleted {', '.join(victims)}"
            except Killed:
                raise
            except (errors.CommitConflict, errors.CheckpointNotFound) as e:
                for vid in victims:
                    if ctx.records.deleting.get(vid) == name:
                        del ctx.records.deleting[vid]
                ctx.records.outcomes[name] = f"refused: {_short(e)}"
            except Exception as e:
                ctx.fail("error", f"delete raised {_short(e)}")

    return ActorSpec(name, "retention", run)


# -- scenarios ----------------------------------------------------------------------------
@dataclass
class Scenario:
    """Actors on one fresh repository, after ``setup`` commits to main, with injections."""

    name: str
    actors: list[ActorSpec]
    setup: int = 0
    #: How many of the oldest setup versions are deleted before the schedule (garbage).
    garbage: int = 0
    kills: list[Kill] = field(default_factory=list)
    freezes: list[Freeze] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{a.name}={a.kind}" for a in self.actors]
        extra = [str(x) for x in (*self.kills, *self.freezes)]
        setup = f", setup {self.setup}" if self.setup else ""
        setup += f", {self.garbage} deleted" if self.garbage else ""
        return (
            f"{self.name}({' '.join(parts)}{setup}){' [' + ', '.join(extra) + ']' if extra else ''}"
        )


@dataclass
class ScheduleResult:
    """What one schedule did and broke."""

    scenario: str
    backend: str
    seed: int | None
    steps: list[Step]
    violations: list[Violation]
    outcomes: dict[str, str]
    ops: Counter[str]
    seconds: float
    pruned: bool = False
    wrapped: list[str] = field(default_factory=list)

    @property
    def choices(self) -> list[str]:
        return [s.actor for s in self.steps]

    def report(self, limit: int = 200) -> str:
        """The schedule as text: scenario, violations, outcomes and the steps."""
        lines = [f"scenario {self.scenario} on {self.backend}, seed {self.seed}"]
        lines += [f"  VIOLATION {v}" for v in self.violations]
        lines += [f"  {name}: {outcome}" for name, outcome in sorted(self.outcomes.items())]
        shown = self.steps[:limit]
        lines += [f"  {s}" for s in shown]
        if len(self.steps) > limit:
            lines.append(f"  ... {len(self.steps) - limit} more steps")
        return "\n".join(lines)


@contextlib.contextmanager
def fresh_uri(backend: str) -> Iterator[str]:
    """An empty repository root: ``memory://`` (a fresh uuid path) or ``file://``."""
    if backend == "memory":
        uri = f"memory://cloudckpt-schedules/{uuid.uuid4().hex}"
        try:
            yield uri
        finally:
            store = Repo(uri).store
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm(store.root, recursive=True)
    elif backend == "file":
        root = tempfile.mkdtemp(prefix="cloudckpt-schedules-")
        try:
            yield f"file://{root}/repo"
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        raise ValueError(f"backend {backend!r}: memory or file")


class Checker:
    """Checks the invariants between steps, reading through an unwrapped handle."""

    def __init__(self, uri: str, records: Records) -> None:
        self.repo = Repo(uri, options=OPTIONS)
        self.records = records
        self.violations: list[Violation] = []
        self._subjects: set[tuple[str, str]] = set()
        self.parents: dict[str, str | None] = {}
        self.writers: dict[str, str] = {}
        self.heads: dict[str, str] = {}
        #: Attempt token -> index of the step after which its version was first in the
        #: index: when the commit took effect (the checker runs after every write).
        self.visible: dict[str, int] = {}
        self._failures = 0
        self._last: tuple[Any, ...] = ()
        self._blobs_of: dict[str, set[str]] = {}
        self._loaded: dict[str, tuple[Any, ...]] = {}

    def add(self, invariant: str, step: int, subject: str, message: str) -> None:
        if (invariant, subject) not in self._subjects:
            self._subjects.add((invariant, subject))
            self.violations.append(Violation(invariant, step, subject, message))

    def check(self, step: int, deep: bool, writes: int | None = None) -> None:
        """All invariants at this step (``deep``: also load and verify acked versions).

        With ``writes`` (the count of writes so far), a check is skipped when neither the
        store nor any record changed since the last one: it would find the same."""
        if writes is not None:
            seen = (
                writes,
                tuple(a.status for a in self.records.attempts.values()),
                len(self.records.acquisitions),
                len(self.records.deleting),
                len(self.records.failures),
            )
            if seen == self._last:
                return
            self._last = seen
        for inv, actor, message, at in self.records.failures[self._failures :]:
            self.add(inv, at, f"{actor}:{message[:60]}", f"{actor}: {message}")
        self._failures = len(self.records.failures)
        try:
            index = self.repo.index()
        except errors.CloudCkptError as e:
            self.add("I1", step, "index", f"versions.json unreadable: {_short(e)}")
            return
        for vid, row in index.versions.items():
            self.parents.setdefault(vid, row.parent)
            self.writers.setdefault(vid, str(row.meta.get("writer", "")))
        self._acknowledged(index, step, deep)
        self._forward(index, step)
        self._fencing(index, step)
        self._restores(index, step)

    # I1
    def _acknowledged(self, index: Any, step: int, deep: bool) -> None:
        listing: dict[str, Any] | None = None
        for a in self.records.attempts.values():
            if a.status != "acked" or a.vid is None or a.vid in self.records.deleting:
                continue
            where = f"{a.vid} ({a.token})"
            if a.vid not in index.versions:
                self.add("I1", step, a.vid, f"acknowledged version {where} is not in the index")
                continue
            try:
                doc = self.repo.manifest(a.vid)
            except errors.CloudCkptError as e:
                self.add("I1", step, a.vid, f"manifest of {where}: {_short(e)}")
                continue
            if listing is None:
                listing = self.repo.store.list_info("")
            needed = self._blobs_of.setdefault(a.vid, _blob_keys(doc))
            missing = needed - listing.keys()
            if missing:
                self.add("I1", step, a.vid, f"{where} lost blobs {sorted(missing)[:2]}")
                continue
            if deep:
                # Loading reads only these objects: while none changed, it finds the same.
                reads = sorted(needed | {k for k in listing if a.vid in k})
                seen = tuple((k, listing[k].size, listing[k].modified) for k in reads)
                if self._loaded.get(a.vid) != seen:
                    self._loads(a, step, where)
                    self._loaded[a.vid] = seen

    def _loads(self, a: Attempt, step: int, where: str) -> None:
        assert a.vid is not None
        try:
            loaded = self.repo.load(a.vid)
            report = self.repo.verify(a.vid)
        except errors.CloudCkptError as e:
            self.add("I1", step, a.vid, f"{where} does not load: {_short(e)}")
            return
        if not same_state(loaded, a.state):
            self.add("I1", step, a.vid, f"{where} loads, but not the state committed")
        if not report.ok:
            self.add("I1", step, a.vid, f"{where} fails verify: {report.problems}")

    # I2
    def _forward(self, index: Any, step: int) -> None:
        for branch, old in self.heads.items():
            new = index.branches.get(branch)
            if new is None:
                self.add("I2", step, branch, f"branch {branch} lost its head {old}")
            elif new != old and not self._descends(new, old):
                self.add(
                    "I2", step, branch,
                    f"head of {branch} moved from {old} ({self.writers.get(old)}) to {new} "
                    f"({self.writers.get(new)}), not a descendant",
                )  # fmt: skip
        self.heads = dict(index.branches)

    def _descends(self, vid: str | None, ancestor: str) -> bool:
        for _ in range(len(self.parents) + 1):
            if vid is None:
                return False
            if vid == ancestor:
                return True
            vid = self.parents.get(vid)
        return False

    # I3
    def _fencing(self, index: Any, step: int) -> None:
        acqs = self.records.acquisitions
        for old in acqs:
            for new in acqs:
                if new.branch != old.branch or new.actor == old.actor or new.step <= old.step:
                    continue
                for a in self.records.attempts.values():
                    took = self.visible.get(a.token, -1)
                    if a.actor == old.actor and a.status == "acked" and took > new.step:
                        self.add(
                            "I3", step, f"{a.token}>{new.actor}",
                            f"{a.token} of {old.actor} took effect at step {took}, after "
                            f"{new.actor} took the lease of {new.branch} at step {new.step}",
                        )  # fmt: skip
                for vid in index.versions:
                    if self.writers.get(vid) == old.actor:
                        self._descends_from(vid, old.actor, new.actor, step)

    def _descends_from(self, vid: str, old: str, new: str, step: int) -> None:
        current = self.parents.get(vid)
        for _ in range(len(self.parents) + 1):
            if current is None:
                return
            if self.writers.get(current) == new:
                self.add(
                    "I3", step, f"{vid}<{new}",
                    f"version {vid} of superseded holder {old} descends from {current} of {new}",
                )  # fmt: skip
                return
            current = self.parents.get(current)

    # I4
    def _restores(self, index: Any, step: int) -> None:
        attempts = self.records.attempts
        for vid, row in index.versions.items():
            token = row.meta.get("attempt")
            attempt = attempts.get(token) if isinstance(token, str) else None
            if attempt is None:
                self.add("I4", step, vid, f"{vid} is in the index but no actor committed it")
                continue
            self.visible.setdefault(attempt.token, step - 1)
        for token, first in self.visible.items():
            a = attempts[token]
            if a.status in ("rejected", "error"):
                self.add(
                    "I4", step, token,
                    f"commit {token} raised ({a.error}) but was in the index after step {first}",
                )  # fmt: skip


def _blob_keys(doc: Any) -> set[str]:
    digests = getattr(doc, "digests", None)
    if callable(digests):
        return {blob_key(d) for d in digests()}
    return {blob_key(c.digest) for entry in doc["tensors"] for c in iter_chunks(entry)}


def run_schedule(
    scenario: Scenario,
    chooser: Chooser,
    *,
    backend: str = "memory",
    seed: int | None = None,
    max_steps: int = 2000,
    deep_every: int = 0,
    step_timeout: float = 30.0,
    time_limit: float = 180.0,
) -> ScheduleResult:
    """Run one schedule of ``scenario`` in the order ``chooser`` picks; check after each
    step (loads at every ``deep_every``-th step, 0: only at the end)."""
    t0 = time.monotonic()
    salt = seed if seed is not None else 0
    records = Records()
    run = _Run([], Counter(), False)
    with fresh_uri(backend) as uri:
        _setup(uri, scenario, records, salt)
        checker = Checker(uri, records)
        checker.check(0, deep=False)
        sched = Scheduler(step_timeout, t0 + time_limit)
        leases: list[WriterLease] = []
        wrapped: list[str] = []
        for spec in scenario.actors:
            ops = [k.op for k in scenario.kills if k.actor == spec.name and k.op is not None]
            sched.add(spec.name, ops[0] if ops else None)
        with virtual_clock(sched, salt):
            try:
                feats = features()
                for i, spec in enumerate(scenario.actors):
                    repo = Repo(uri, options=OPTIONS)
                    wrapped = sched.wrap(repo.store, spec.name)
                    ctx = Ctx(spec.name, repo, records, sched, salt, 100 * (i + 1), feats, leases)
                    if not sched.start(spec.name, functools.partial(_body, spec, ctx)):
                        checker.add("hang", 0, spec.name, f"{spec.name} does not start")
                _drive(sched, scenario, chooser, checker, run, max_steps, deep_every)
            finally:
                stuck = sched.abort(join=step_timeout)
                for lease in leases:  # no heartbeat outlives its schedule
                    stop = getattr(lease, "_stop", None)
                    if isinstance(stop, threading.Event):
                        stop.set()
        for name in stuck:
            checker.add("hang", sched.step, f"{name}:stuck", f"{name} did not stop when aborted")
        if not run.pruned:
            checker.check(sched.step, deep=True)
    outcomes = {}
    for spec in scenario.actors:
        mine = [a for a in records.attempts.values() if a.actor == spec.name]
        said = [f"{a.token} {a.status}" + (f" ({a.error[:80]})" if a.error else "") for a in mine]
        said += [records.outcomes[spec.name]] if records.outcomes.get(spec.name) else []
        if not said and sched.actors[spec.name].killed:
            said = ["killed before its first store call"]
        outcomes[spec.name] = "; ".join(said)
    return ScheduleResult(
        scenario.describe(), backend, seed, run.steps, checker.violations, outcomes, run.ops,
        time.monotonic() - t0, run.pruned, wrapped,
    )  # fmt: skip


@dataclass
class _Run:
    steps: list[Step]
    ops: Counter[str]
    pruned: bool


def _setup(uri: str, scenario: Scenario, records: Records, salt: int) -> None:
    """Commit the scenario's setup versions (unscheduled) and delete its garbage."""
    setup = Repo(uri, options=OPTIONS)
    for i in range(scenario.setup):
        token = f"setup#{i}"
        state = make_state(-1 - i, salt)
        v = setup.commit(state, step=i, meta={"writer": "setup", "attempt": token})
        records.attempts[token] = Attempt(token, "setup", "main", state, "acked", v.id)
    doomed = [a.vid for a in records.attempts.values() if a.vid][: scenario.garbage]
    if doomed:
        setup.delete(doomed)
        records.deleting.update(dict.fromkeys(doomed, "setup"))


def _drive(
    sched: Scheduler,
    scenario: Scenario,
    chooser: Chooser,
    checker: Checker,
    run: _Run,
    max_steps: int,
    deep_every: int,
) -> None:
    """Grant steps until every actor is done, checking after each; stop at a hang."""
    kills_at = {k.step: k.actor for k in scenario.kills if k.step is not None}
    for _ in range(max_steps + 1):
        step = sched.step
        for f in scenario.freezes:
            if f.step == step and f.actor in sched.actors:
                sched.actors[f.actor].frozen_until = step + f.steps
        if step in kills_at and not sched.kill(kills_at[step]):
            checker.add("hang", step, kills_at[step], f"killed {kills_at[step]} runs on")
            return
        enabled = sched.enabled()
        if not enabled:
            return
        if step >= max_steps or _real_monotonic() > sched.deadline:
            running = [a.name for a in enabled]
            checker.add("hang", step, "bound", f"schedule exceeds its bounds: {running} run on")
            return
        pick = chooser.choose(
            [a.name for a in enabled], {a.name: a.waiting[0].method for a in enabled}
        )
        if pick is None:
            run.pruned = True
            return
        request, settled = sched.grant(pick)
        run.steps.append(Step(step, pick, request.method, request.key))
        run.ops[request.method] += 1
        if not settled:
            message = f"{pick} did not finish {request.method} nor reach its next step in time"
            checker.add("hang", step, pick, message)
            return
        deep = deep_every > 0 and sched.step % deep_every == 0
        checker.check(sched.step, deep, writes=sched.writes)


def _body(spec: ActorSpec, ctx: Ctx) -> None:
    try:
        spec.run(ctx)
    except Killed:
        mine = ctx.records.attempts.values()
        if not any(a.actor == spec.name and a.status == "killed" for a in mine):
            ctx.records.outcomes[spec.name] = "killed"
    except Exception as e:  # an actor's own bug, or an API it did not expect
        ctx.fail("error", f"{spec.kind} actor raised {_short(e)}")


# -- exhaustive exploration ---------------------------------------------------------------
def independent(a: str, b: str) -> bool:
    """Two store calls of different actors commute: both only read."""
    return a in READ_ONLY and b in READ_ONLY


@dataclass
class _Node:
    enabled: list[str]
    ops: dict[str, str]
    sleep: set[str]
    prev: str | None  # the actor that took the step before this one
    preempt: int  # preemptions before this node
    explored: list[str] = field(default_factory=list)
    choice: str = ""

    def cost(self, name: str) -> int:
        """1 if running ``name`` preempts the previous actor, which could go on."""
        return int(self.prev is not None and name != self.prev and self.prev in self.enabled)


class DepthFirst:
    """Stateless depth-first search over schedules with sleep sets and a preemption bound.

    Re-executes from scratch for each schedule, replaying the choices on the stack.
    With ``reduce``, an actor whose pending call commutes with everything explored since
    an alternative to it was taken sleeps (Godefroid's sleep sets), so no two complete
    schedules explored are equivalent up to swapping adjacent reads. With ``bound``,
    only schedules with at most that many preemptions (switching away from an actor that
    could go on) are explored; ``bounded`` tells whether that left any out.
    """

    def __init__(self, reduce: bool = True, bound: int | None = None) -> None:
        self.reduce = reduce
        self.bound = bound
        self.bounded = False
        self.stack: list[_Node] = []
        self.depth = 0
        self.diverged = 0

    def _allowed(self, node: _Node, names: Iterable[str]) -> list[str]:
        fits = [n for n in names if self.bound is None or node.preempt + node.cost(n) <= self.bound]
        self.bounded |= len(fits) < len(list(names))
        return fits

    def choose(self, enabled: Sequence[str], ops: dict[str, str]) -> str | None:
        names = list(enabled)
        if self.depth < len(self.stack):
            node = self.stack[self.depth]
            if node.enabled == names and node.ops == ops:
                self.depth += 1
                return node.choice
            self.diverged += 1  # not deterministic after all: explore from here afresh
            del self.stack[self.depth :]
        sleep: set[str] = set()
        prev, preempt = None, 0
        if self.stack:
            parent = self.stack[-1]
            prev, preempt = parent.choice, parent.preempt + parent.cost(parent.choice)
            if self.reduce:
                taken = parent.ops[parent.choice]
                sleep = {
                    b
                    for b in parent.sleep | set(parent.explored)
                    if b in names
                    and independent(parent.ops[b], taken)
                    and ops.get(b) == parent.ops[b]
                }
        node = _Node(names, dict(ops), sleep, prev, preempt)
        awake = self._allowed(node, [n for n in names if n not in sleep])
        if not awake:
            return None  # every continuation is equivalent to one explored, or over the bound
        node.choice = awake[0]
        self.stack.append(node)
        self.depth += 1
        return node.choice

    def next(self) -> bool:
        """Move to the next unexplored schedule; False when all are explored."""
        self.depth = 0
        while self.stack:
            node = self.stack[-1]
            node.explored.append(node.choice)
            rest = [n for n in node.enabled if n not in node.sleep and n not in node.explored]
            rest = self._allowed(node, rest)
            if rest:
                node.choice = rest[0]
                return True
            self.stack.pop()
        return False


@dataclass
class Exploration:
    """The outcome of exploring a scenario's schedules."""

    scenario: str
    schedules: int = 0
    pruned: int = 0
    steps: int = 0
    complete: bool = False
    diverged: int = 0
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    failures: list[ScheduleResult] = field(default_factory=list)

    @property
    def violations(self) -> list[Violation]:
        return [v for r in self.failures for v in r.violations]

    def summary(self) -> str:
        done = "all" if self.complete else "capped at"
        return (
            f"{self.scenario}: {done} {self.schedules} schedules ({self.pruned} pruned), "
            f"{self.steps} steps, {len(self.failures)} failing, {self.seconds:.1f}s"
        )


def explore(
    scenario: Scenario,
    *,
    backend: str = "memory",
    max_schedules: int = 200,
    time_budget: float = 60.0,
    stop_at_first: bool = False,
    reduce: bool = True,
    deep_every: int = 1,
    preemptions: int | None = 0,
) -> Exploration:
    """Enumerate the schedules of ``scenario`` up to the caps: with ``preemptions`` (a
    start bound), those with at most 0, 1, 2, 4, 8, then any number of preemptions in
    turn (each level re-runs the schedules of the last, uncounted), so that a capped
    run covers the schedules with few context switches (where most races show) before
    the long tails of one schedule; with None, plain depth-first order."""
    if any(k.step is not None for k in scenario.kills) or scenario.freezes:
        reduce = False  # step-numbered injections do not commute with anything
    out = Exploration(scenario.describe())
    t0 = time.monotonic()
    seen: set[tuple[str, ...]] = set()
    bound = preemptions
    while not out.complete:
        search = DepthFirst(reduce, bound)
        while out.schedules < max_schedules and time.monotonic() - t0 < time_budget:
            result = run_schedule(scenario, search, backend=backend, deep_every=deep_every)
            key = tuple(result.choices)
            if key not in seen:  # a lower bound ran it already
                seen.add(key)
                out.schedules += 1
                out.pruned += result.pruned
                out.steps += len(result.steps)
                out.ops.update(result.ops)
                if result.violations:
                    out.failures.append(result)
            if (stop_at_first and out.failures) or not search.next():
                break
        else:
            out.diverged += search.diverged
            break  # a cap
        out.diverged += search.diverged
        if stop_at_first and out.failures:
            break
        out.complete = not search.bounded
        bound = None if bound is None or bound >= 8 else max(1, 2 * bound)
    out.seconds = time.monotonic() - t0
    return out


# -- random schedules ---------------------------------------------------------------------
TEMPLATES: dict[str, Callable[[random.Random], tuple[list[ActorSpec], int]]] = {
    "race": lambda r: ([committer("a"), committer("b")], r.randint(0, 1)),
    "ff-race": lambda r: ([committer("a", fast_forward=True), committer("b")], r.randint(0, 1)),
    "gc": lambda r: ([committer("a"), gc_actor("g")], r.randint(0, 2)),
    "gc2": lambda r: ([committer("a"), gc_actor("g"), gc_actor("h")], r.randint(0, 2)),
    "repair": lambda r: ([committer("a"), committer("b", n=1), repair_actor("r")], r.randint(0, 1)),
    "retention": lambda r: ([committer("a"), retention_actor("d"), gc_actor("g")], 2),
    "lease": lambda r: ([lease_holder("h"), lease_holder("t", n=1, force=True)], r.randint(0, 1)),
    "branches": lambda r: ([committer("a", n=1), committer("b", "dev"), gc_actor("g")], 1),
    "mix": lambda r: (
        [
            committer("a"),
            committer("b", n=1),
            gc_actor("g"),
            repair_actor("r"),
            retention_actor("d", rounds=1),
        ],
        2,
    ),
}


def random_scenario(seed: int) -> tuple[Scenario, str]:
    """The scenario and backend a seed stands for: a template, setup, kills, freezes."""
    rng = random.Random(seed)
    name = rng.choice(sorted(TEMPLATES))
    actors, setup = TEMPLATES[name](rng)
    scenario = Scenario(name, actors, setup)
    if rng.random() < 0.25:
        scenario.kills.append(Kill(rng.choice(actors).name, step=rng.randrange(1, 30)))
    if rng.random() < 0.25:
        who = rng.choice(actors).name
        scenario.freezes.append(Freeze(who, rng.randrange(0, 20), rng.randint(1, 25)))
    backend = "file" if rng.random() < 0.2 else "memory"
    return scenario, backend


def run_random(seed: int, *, deep_every: int = 8, **kwargs: Any) -> ScheduleResult:
    """The schedule seed ``seed`` stands for (scenario, backend and every choice)."""
    scenario, backend = random_scenario(seed)
    chooser = RandomChooser(seed)
    return run_schedule(scenario, chooser, backend=backend, seed=seed, deep_every=deep_every,
                        **kwargs)  # fmt: skip


def run_many(seeds: Iterable[int], **kwargs: Any) -> Iterator[ScheduleResult]:
    """Random schedules, one per seed."""
    for seed in seeds:
        yield run_random(seed, **kwargs)
