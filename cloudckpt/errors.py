"""Errors raised by cloudckpt. Each message names the object and what to do."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class CloudCkptError(Exception):
    """Base class of every error cloudckpt raises."""


class CheckpointNotFound(CloudCkptError, LookupError):
    """A ref (branch, tag, version id) or an object it needs does not exist."""


class CorruptCheckpoint(CloudCkptError):
    """Stored data failed a hash, length or format check."""


class InvalidKey(CloudCkptError, ValueError):
    """An object key that could reach outside the store's root (``..``, an absolute path,
    an empty segment); it was refused before any request."""


class CommitConflict(CloudCkptError):
    """Another writer moved the branch head while this commit was in progress."""


class StoreError(CloudCkptError, OSError):
    """The object store failed, after retries where the failure was retryable."""


class UnsupportedState(CloudCkptError, TypeError):
    """The state holds an object cloudckpt cannot store without pickle."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists, or its ETag changed."""


class LeaseHeld(CloudCkptError):
    """Another job holds the writer lease of the branch (the message names it)."""


class FencedOut(LeaseHeld):
    """A commit was refused because its writer lease passed to another job meanwhile
    (the branch's fencing token moved past the one the commit carried)."""


class SweepExpired(CloudCkptError):
    """A garbage collection stopped before deleting: its sweep was not renewed in time
    (the process was frozen or cut off), so commits may already rely on what it marked."""


class RanksUnreachable(CloudCkptError):
    """A rank of the job stopped answering the checkpoint's process group: its connection
    closed (the process was killed) or it did not answer within the group's timeout
    (``DistributedOptions(timeout=...)``: it is frozen or cut off). The ranks can no
    longer agree on anything, so the step fails on every rank that waits on that one --
    each within the timeout -- instead of being shared like a :class:`RanksFailed`; restart
    the job. What was saved before, local saves included, is kept."""


class UnsupportedFormat(CorruptCheckpoint):
    """A stored object was written in a format this cloudckpt does not read (a newer
    release wrote it): upgrade cloudckpt; nothing is repaired over it."""


#: The kinds of error that keep their class when they cross from one rank to the others;
#: any other exception arrives there as the nearest of them (``CloudCkptError`` at least).
KINDS: tuple[type[CloudCkptError], ...] = (
    CloudCkptError,
    CheckpointNotFound,
    CorruptCheckpoint,
    InvalidKey,
    CommitConflict,
    StoreError,
    UnsupportedState,
    PreconditionFailed,
    LeaseHeld,
    FencedOut,
    SweepExpired,
    UnsupportedFormat,
    RanksUnreachable,
)


@dataclass(frozen=True)
class RankFailure:
    """What one rank raised in a step that every rank of a job took part in."""

    rank: int
    #: The name of its kind in :data:`KINDS`.
    kind: str
    #: ``"ExceptionType: message"``, as that rank saw it.
    message: str

    @classmethod
    def of(cls, rank: int, error: BaseException) -> RankFailure:
        """The record of ``error``, raised on ``rank``."""
        kind = next((c for c in type(error).__mro__ if c in KINDS), CloudCkptError)
        return cls(rank, kind.__name__, f"{type(error).__name__}: {error}")


class RanksFailed(CloudCkptError):
    """One or more ranks failed a step they all took part in; every rank raises the same.

    The error raised is also an instance of the first failed rank's kind (a ``StoreError``
    on rank 1 is a ``StoreError`` on every rank), so that the ``except`` clauses of a single
    process catch it; ``failures`` holds each failed rank's record.
    """

    def __init__(self, message: str, failures: Mapping[int, RankFailure]) -> None:
        super().__init__(message)
        self.failures: dict[int, RankFailure] = dict(failures)

    @classmethod
    def of(cls, failures: Iterable[RankFailure], context: str = "") -> RanksFailed:
        """The error for ``failures`` (at least one; one record per rank kept), its message
        ``context`` followed by each rank's, in rank order."""
        by_rank = {f.rank: f for f in sorted(failures, key=lambda f: f.rank)}
        first = next(iter(by_rank.values()))
        message = context + "; ".join(f"rank {f.rank}: {f.message}" for f in by_rank.values())
        return _ranks_failed_as(first.kind)(message, by_rank)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # The class is made at runtime (one per kind): rebuild it by kind.
        first = next(iter(self.failures.values()))
        return _rebuild, (first.kind, str(self), self.failures)


@functools.cache
def _ranks_failed_as(kind_name: str) -> type[RanksFailed]:
    kind = next((c for c in KINDS if c.__name__ == kind_name), CloudCkptError)
    if kind is CloudCkptError:
        return RanksFailed
    namespace = {"__module__": __name__, "__qualname__": kind.__qualname__, "__doc__": kind.__doc__}
    return type(kind.__name__, (kind, RanksFailed), namespace)


def _rebuild(kind_name: str, message: str, failures: Mapping[int, RankFailure]) -> RanksFailed:
    return _ranks_failed_as(kind_name)(message, failures)
