"""Errors raised by cloudckpt. Each message names the object and what to do."""

from __future__ import annotations


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


class UnsupportedFormat(CorruptCheckpoint):
    """A stored object was written in a format this cloudckpt does not read (a newer
    release wrote it): upgrade cloudckpt; nothing is repaired over it."""
