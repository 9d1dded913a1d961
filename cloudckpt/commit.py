"""The commit transaction: begin, upload, publish -- one path for every writer.

``Repo.commit``, the spread writes of several ranks and the DCP storage writer all drive
the same :class:`Transaction`:

1. **begin** reads ``versions.json`` once: the branch head (the parent), the garbage
   collector's epoch, whether a sweep is running, and the branch's fencing token.
2. **upload**: the blobs the parent does not hold are stored (or found already stored).
3. **publish** writes the manifest (create-if-absent), then swaps ``versions.json``
   (compare-and-swap) on four conditions: the branch head is still the parent, the
   fencing token is still the commit's, no garbage collection is sweeping, and none
   started since the commit's blobs were last known to be stored. When a collection did
   run, the commit waits for its sweep to end, checks its blobs and manifest, stores
   again what was swept, and tries again. Last, ``published/<version>`` records the
   acknowledgement for ``repair``.

docs/protocol.md states the invariants this keeps and argues them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudckpt import codec, manifest, schema, versions
from cloudckpt.blobs import BlobWriter, TransferOptions, TransferStats
from cloudckpt.blobs.cache import BlobCache
from cloudckpt.blobs.chunks import blob_key
from cloudckpt.errors import CloudCkptError, CommitConflict, CorruptCheckpoint
from cloudckpt.manifest import Manifest
from cloudckpt.store import Store
from cloudckpt.turns import Turn, wait_for_sweeps
from cloudckpt.versions import Index, Version

log = logging.getLogger("cloudckpt")

#: Publishing tries at most this many times when garbage collections keep starting...
_ATTEMPTS = 16
#: ... and re-parents at most this many times (``fast_forward``) when the branch moves.
_MOVES = 64
#: Above this many blobs, checking them is one listing instead of a HEAD each.
_HEAD_AT_MOST = 64


def new_version_id() -> str:
    """Sortable by creation time, unique across writers."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class CommitRequest:
    """What a commit records besides the state, and how it publishes.

    ``fence`` is the writer lease's fencing token (:attr:`WriterLease.fence`): the
    commit is refused with FencedOut if the lease passed to another job meanwhile.
    ``fast_forward`` commits on top of a head that moved instead of failing.
    """

    branch: str = "main"
    step: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    message: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    fast_forward: bool = False
    fence: int | None = None

    def __post_init__(self) -> None:
        # What a reader would refuse is refused here, before anything is uploaded.
        try:
            schema.name(self.branch)
            schema.optional(schema.integer)(self.step)
            schema.check_depth(dict(self.meta), schema.MAX_DEPTH - 4)
        except schema.Invalid as e:
            raise ValueError(f"commit: {e}") from None


@dataclass(frozen=True)
class Start:
    """What :meth:`Transaction.begin` read; sent to other ranks so that all of them
    upload against the same parent and the publishing rank knows when they started."""

    parent: str | None
    gc_epoch: int
    #: No garbage collection was sweeping at the start.
    clean: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Start:
        return cls(doc["parent"], int(doc["gc_epoch"]), bool(doc["clean"]))


#: Stores again the blobs whose hashes it is given (a garbage collection swept them).
Restore = Callable[[set[str]], None]


class Transaction:
    """One commit of a state to a branch of the repository in ``store``."""

    def __init__(
        self,
        store: Store,
        transfer: TransferOptions,
        request: CommitRequest,
        start: Start | None = None,
        cache: BlobCache | None = None,
    ) -> None:
        self.store, self.transfer, self.request = store, transfer, request
        self.start, self.cache = start, cache
        self.t0 = time.perf_counter()
        self.known: dict[str, int] = {}

    def begin(self) -> Transaction:
        """Read the index (unless a start was given) and the parent's blobs."""
        if self.start is None:
            index = versions.read(self.store)[0]
            self._check_fence(index)
            if self.request.branch not in index.branches:  # this commit makes the branch
                try:
                    schema.new_name(self.request.branch)
                except schema.Invalid as e:
                    raise ValueError(str(e)) from None
            self.start = Start(
                index.branches.get(self.request.branch), index.gc_epoch, not index.sweeps
            )
        parent = self.start.parent
        if parent is not None:
            try:
                self.known = manifest.read(self.store, parent).stored_sizes()
            except CorruptCheckpoint as e:  # a damaged parent must not block new commits
                log.warning("cannot reuse blobs of parent %s: %s", parent, e)
        return self

    def writer(self) -> BlobWriter:
        """A blob writer that skips the parent's blobs (known to be stored)."""
        return BlobWriter(self.store, self.transfer, self.known, self.cache)

    def publish(
        self,
        skeleton: Any,
        entries: list[dict[str, Any]],
        stats: TransferStats,
        *,
        extra: Mapping[str, Any] | None = None,
        restore: Restore | None = None,
    ) -> Version:
        """Make the uploaded blobs a version (see the module docstring).

        ``restore`` stores again blobs a concurrent garbage collection swept; without
        it, such a commit raises CommitConflict (commit again: its blobs are reused).
        """
        req = self.request
        base = Version(
            id="",
            branch=req.branch,
            step=req.step,
            metrics={k: float(v) for k, v in req.metrics.items()},
            message=req.message,
            meta=json.loads(json.dumps(dict(req.meta))),
            logical_bytes=stats.logical_bytes,
            stored_bytes=stats.stored_bytes,
            uploaded_bytes=stats.transferred_bytes,
            fence=req.fence,
        )
        with Turn(self.store) as turn:
            return self._publish(base, skeleton, entries, stats, extra, restore, turn)

    def _publish(
        self,
        base: Version,
        skeleton: Any,
        entries: list[dict[str, Any]],
        stats: TransferStats,
        extra: Mapping[str, Any] | None,
        restore: Restore | None,
        turn: Turn,
    ) -> Version:
        start, req = self._started(), self.request
        parent, epoch, checked = start.parent, start.gc_epoch, start.clean
        tries = moves = 0
        while tries < _ATTEMPTS and moves < _MOVES:
            stats.seconds = time.perf_counter() - self.t0
            row = dataclasses.replace(
                base,
                id=new_version_id(),
                parent=parent,
                created=time.time(),
                seconds=stats.seconds,
            )
            doc = Manifest(row, skeleton, entries, self.transfer.chunk_size, dict(extra or {}))
            data = doc.encode()
            if not self.store.put_if_absent(manifest.key(row.id), data):
                raise CommitConflict(f"{self.store.url(manifest.key(row.id))} already exists")
            row = dataclasses.replace(row, manifest_hash=codec.content_hash(data))
            while tries < _ATTEMPTS:
                try:
                    versions.update(
                        self.store,
                        lambda ix, r=row, e=epoch, c=checked: self._add(ix, r, e, c, turn),
                    )
                    turn.left()  # no read of the index to withdraw a turn it removed
                    self._acknowledge(row)
                    return row
                except _Unchecked:
                    # Held up by a collection: take a turn, so that no new one starts
                    # sweeping before this commit has checked its blobs and published.
                    tries += 1
                    turn.take()
                    epoch = self._check(doc, data, restore)
                    checked = True
                except _BranchMoved as moved:
                    if not req.fast_forward:
                        raise CommitConflict(
                            f"{self.store.uri}: branch {req.branch!r} moved from {parent} to "
                            f"{moved.head} while this commit was uploading; commit again (its "
                            "blobs are reused), pass fast_forward=True, or use another branch"
                        ) from None
                    log.info(
                        "branch %s moved to %s; committing on top of it", req.branch, moved.head
                    )
                    parent, moves = moved.head, moves + 1
                    break
        if moves >= _MOVES:
            raise CommitConflict(
                f"{self.store.uri}: branch {req.branch!r} kept moving while this commit tried "
                f"to publish on top of it ({_MOVES} times); too many writers on one branch"
            )
        raise CommitConflict(
            f"{self.store.uri}: garbage collections kept starting while this commit tried to "
            f"publish ({_ATTEMPTS} attempts); commit again"
        )

    # -- the steps ---------------------------------------------------------------------
    def _started(self) -> Start:
        if self.start is None:
            raise RuntimeError("Transaction.begin() was not called")
        return self.start

    def _check_fence(self, index: Index) -> None:
        req, where = self.request, self.store.url(versions.KEY)
        versions.check_fence(index, req.branch, req.fence, where, "the commit was not published")

    def _add(self, index: Index, row: Version, epoch: int, checked: bool, turn: Turn) -> bool:
        if row.id in index.versions:
            return False  # an earlier attempt of this swap took effect
        self._check_fence(index)
        if index.sweeps or index.gc_epoch != epoch or not checked:
            raise _Unchecked
        head = index.branches.get(row.branch)
        if head != row.parent:
            raise _BranchMoved(head)
        index.versions[row.id] = row
        index.branches[row.branch] = row.id
        turn.leave(index)
        return True

    def _check(self, doc: Manifest, data: bytes, restore: Restore | None) -> int:
        """After a garbage collection ran: wait until none sweeps, then make sure every
        blob and the manifest are stored. Returns the epoch they were checked under."""
        epoch = wait_for_sweeps(self.store)
        missing = doc.digests() - present_blobs(self.store, doc.digests())
        if missing:
            if restore is None:
                raise CommitConflict(
                    f"{self.store.uri}: a garbage collection removed {len(missing)} blobs this "
                    "commit had uploaded or reused before it could publish; commit again"
                )
            log.warning(
                "a garbage collection swept %d blobs of this commit; storing them again",
                len(missing),
            )
            restore(missing)
        key = manifest.key(doc.id)
        if self.store.stat(key) is None:
            self.store.put_if_absent(key, data)
        return epoch

    def _acknowledge(self, row: Version) -> None:
        marker = json.dumps({"branch": row.branch, "fence": row.fence}).encode()
        try:
            self.store.put(manifest.marker_key(row.id), marker)
        except CloudCkptError as e:  # published all the same; only repair reads markers
            log.warning(
                "version %s is published but its marker could not be written: %s", row.id, e
            )
        log.debug(
            "published %s on %s (parent %s, fence %s)", row.id, row.branch, row.parent, row.fence
        )


def present_blobs(store: Store, digests: set[str]) -> set[str]:
    """Which of these blobs the store holds (a HEAD each, or one listing for many)."""
    if len(digests) <= _HEAD_AT_MOST:
        return {d for d in digests if store.stat(blob_key(d)) is not None}
    return {k.rsplit("/", 1)[-1] for k in store.list_info("blobs")} & digests


class _Unchecked(Exception):
    """A garbage collection is sweeping, or ran since the commit's blobs were known."""


class _BranchMoved(CommitConflict):
    def __init__(self, head: str | None) -> None:
        super().__init__(f"branch head moved to {head}")
        self.head = head
