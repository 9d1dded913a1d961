"""The explorer's vocabulary: steps, kills and freezes, violations, choosers, what actors
record, and which fencing API the library under test offers."""

from __future__ import annotations

import inspect
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cloudckpt import errors
from cloudckpt.blobs import TransferOptions
from cloudckpt.lease import WriterLease
from cloudckpt.repo import Repo, RepoOptions

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


def short(e: BaseException) -> str:
    """An exception as one short line for reports."""
    return f"{type(e).__name__}: {str(e)[:240]}"
