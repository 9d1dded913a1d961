"""Garbage collection: sweep the manifests and blobs no live version reaches.

A collection lists the store, then *registers its sweep* in ``versions.json`` -- one
compare-and-swap that bumps the gc epoch and names the sweep -- and reads the live set
from that very swap. A commit that started before the bump, or while any sweep runs,
cannot publish until the sweeps have ended and it has checked that its blobs are still
stored (``cloudckpt.commit``); so what a collection deletes is never in a version it did
not see. That holds for every ``grace``, 0 included: the grace only spares data of
versions deleted less than ``grace`` ago (a reader may be loading one) and young
objects of commits still running (so that they need not upload them again).

The sweep is renewed every ``sweep_ttl``/3 seconds; before every delete request the
collection checks that its last renewal is recent, by its own monotonic clock, so one
that was frozen (SIGSTOP, a paused VM) past its ttl -- when commits may already treat it
as dead -- stops instead of deleting by a stale listing. Ages are measured by the
store's clock: object times against the time ``versions.json`` was written by the
registering swap.

Any number of collections may run at once; deleting what another already deleted is
not an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cloudckpt import heartbeat, manifest, turns, versions
from cloudckpt.errors import CloudCkptError, CorruptCheckpoint, SweepExpired
from cloudckpt.store import ObjectInfo, Store
from cloudckpt.versions import MAX_SWEEP_TTL, Index, Sweep

log = logging.getLogger("cloudckpt")

#: The default grace period: a reader of a deleted version has this long to finish.
DEFAULT_GRACE = 2 * 3600.0
#: A sweep not renewed for this long is dead to commits waiting for it.
SWEEP_TTL = 60.0
#: Incomplete multipart uploads and temporary files are another writer's work in
#: progress until they are this old, whatever the grace (a commit may still be writing).
ABANDONED_AFTER = 3600.0


@dataclass
class GCReport:
    """What a garbage collection removed (or would remove, in a dry run)."""

    manifests: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_blobs: int = 0
    #: Incomplete multipart uploads aborted and temporary files removed (left by writers
    #: that died mid-upload).
    aborted_uploads: int = 0
    #: Deleted versions whose data this collection removed (their grace had passed).
    expired: list[str] = field(default_factory=list)
    dry_run: bool = False


def collect(
    store: Store,
    grace: float = DEFAULT_GRACE,
    dry_run: bool = False,
    sweep_ttl: float = SWEEP_TTL,
    abandoned_after: float = ABANDONED_AFTER,
) -> GCReport:
    """Remove the manifests and blobs that no live version reaches and that are older
    than ``grace`` seconds; safe with commits, other collections, repair and retention
    running at once, for any ``grace`` >= 0. Incomplete uploads and temporary files
    older than ``abandoned_after`` (and than ``grace``) are removed too."""
    if not 0 <= grace < math.inf or not 0 <= abandoned_after < math.inf:
        raise ValueError(f"grace must be >= 0 seconds, not {grace}")
    if not 0 < sweep_ttl <= MAX_SWEEP_TTL:
        raise ValueError(f"sweep_ttl must be in (0, {MAX_SWEEP_TTL:.0f}] seconds, not {sweep_ttl}")
    listed = _Listing.of(store)
    report = GCReport(dry_run=dry_run)
    if dry_run:
        index = versions.read(store)[0]
        _decide(store, index, listed, _store_now(store, listed), grace, report)
        return report
    with _SweepLease(store, sweep_ttl) as sweep:
        now = _store_now(store, listed)
        markers = _decide(store, sweep.index, listed, now, grace, report)
        # Markers first (repair must not bring back a version being swept), then blobs
        # (a manifest without its blobs is never live), then the manifests.
        store.delete(markers, guard=sweep.guard)
        store.delete(report.blobs, guard=sweep.guard)
        store.delete(report.manifests, guard=sweep.guard)
        sweep.guard()
        report.aborted_uploads = store.abort_stale_uploads(now - max(grace, abandoned_after))
        sweep.finish(now, report.expired)
    log.info(
        "gc %s: %d manifests, %d blobs, %.1f MB %s; %d blobs kept",
        store.uri,
        len(report.manifests),
        len(report.blobs),
        report.freed_bytes / 1e6,
        "would be freed" if dry_run else "freed",
        report.kept_blobs,
    )
    return report


@dataclass(frozen=True)
class _Listing:
    """What gc may delete: the objects whose keys are of the repository's own layout.
    Anything else under its prefixes (another tool's objects, hostile names) is left."""

    manifests: dict[str, ObjectInfo]
    markers: dict[str, ObjectInfo]
    blobs: dict[str, ObjectInfo]

    @classmethod
    def of(cls, store: Store) -> _Listing:
        def ours(prefix: str, layout: Callable[[str], bool]) -> dict[str, ObjectInfo]:
            found = store.list_info(prefix)
            kept = {k: info for k, info in found.items() if layout(k)}
            if len(kept) < len(found):
                log.warning(
                    "gc: leaving %d objects under %s/ that are not cloudckpt's: %s",
                    len(found) - len(kept),
                    prefix,
                    ", ".join(sorted(set(found) - set(kept))[:5]),
                )
            return kept

        return cls(
            ours(manifest.PREFIX, manifest.is_key),
            ours(manifest.MARKERS, manifest.is_marker_key),
            ours("blobs", lambda k: _BLOB_KEY.fullmatch(k) is not None),
        )


_BLOB_KEY = re.compile(r"blobs/([0-9a-f]{2})/\1[0-9a-f]{30}")


def _store_now(store: Store, listed: _Listing) -> float:
    """The store's time: when versions.json was last written (by this collection's
    registering swap), or else the newest object listed (a lower bound: objects then look
    younger, and more is kept)."""
    info = store.stat(versions.KEY)
    if info is not None:
        return info.modified
    times = [i.modified for part in (listed.manifests, listed.blobs) for i in part.values()]
    return max(times, default=0.0)


def _decide(
    store: Store, index: Index, listed: _Listing, now: float, grace: float, report: GCReport
) -> list[str]:
    """Fill ``report`` with what to sweep; returns the published markers to remove."""
    # A deletion not stamped yet happened before this collection registered its sweep:
    # ``now`` is its latest possible time.
    live = set(index.versions) | {v for v, t in index.deleted.items() if now - (t or now) < grace}
    # Forgotten only once their manifest is swept here: one deleted after the listing
    # keeps its tombstone (else repair would find its manifest and bring it back).
    report.expired = sorted(
        v for v in set(index.deleted) - live if manifest.key(v) in listed.manifests
    )
    young = {
        manifest.vid_of(k) for k, info in listed.manifests.items() if now - info.modified < grace
    }
    marked: set[str] = set()
    for vid in sorted(live | young):
        try:
            marked |= manifest.read(store, vid).digests()
        except CorruptCheckpoint as e:
            if vid in index.versions and store.stat(manifest.key(vid)) is not None:
                raise  # never sweep what a damaged live manifest might still need
            log.warning("gc: skipping unreadable manifest of %s: %s", vid, e)
    report.manifests = [k for k in listed.manifests if manifest.vid_of(k) not in live | young]
    swept = {manifest.vid_of(k) for k in report.manifests}
    for key, info in listed.blobs.items():
        if key.rsplit("/", 1)[-1] in marked or now - info.modified < grace:
            report.kept_blobs += 1
            continue
        report.blobs.append(key)
        report.freed_bytes += info.size
    return [
        k
        for k, info in listed.markers.items()
        if manifest.vid_of(k) in swept
        or (manifest.vid_of(k) not in live and now - info.modified >= grace)
    ]


class _SweepLease:
    """This collection's entry in ``versions.json``'s running sweeps, renewed from a
    thread; ``guard()`` raises SweepExpired once it may have lapsed."""

    def __init__(self, store: Store, ttl: float, patience: float = turns.MAX_DEFERENCE) -> None:
        if ttl <= 0:
            raise ValueError("sweep_ttl must be positive")
        self.store, self.ttl, self.patience = store, ttl, patience
        self.token = secrets.token_hex(8)
        self.index = Index()
        self._seq = 0
        self._renewed = 0.0  # monotonic time the last successful renewal was sent
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stamp: list[str] = []

    def __enter__(self) -> _SweepLease:
        def register(ix: Index) -> None:
            # Called right before each attempt's swap is sent: the renewal time may only
            # be too early (safe), never too late, however long commits were let go first.
            self._renewed = time.monotonic()
            ix.gc_epoch += 1
            ix.sweeps[self.token] = Sweep(0, self.ttl)

        self.index = turns.after_waiting_commits(self.store, register, self.patience)
        self._stamp = [v for v, t in self.index.deleted.items() if t is None]
        self._thread = heartbeat.start(self, self._stop, "cloudckpt-gc")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.token:  # not finished: withdraw the sweep
            with contextlib.suppress(CloudCkptError):
                versions.update(self.store, self._withdraw)

    @property
    def lost(self) -> str | None:
        return self._lost

    def guard(self) -> None:
        if self._lost is None and time.monotonic() - self._renewed > self.ttl * 2 / 3:
            self._lost = (
                f"this garbage collection's sweep was not renewed for {self.ttl * 2 / 3:.0f}s "
                "(frozen or cut off from the store); it stopped before deleting more"
            )
        if self._lost is not None:
            raise SweepExpired(f"{self.store.uri}: {self._lost}")

    def renew(self) -> None:
        sent = time.monotonic()

        def bump(ix: Index) -> None:
            sweep = ix.sweeps.get(self.token)
            if sweep is None:
                raise SweepExpired("the sweep was removed by a commit that found it dead")
            ix.sweeps[self.token] = Sweep(sweep.seq + 1, sweep.ttl)

        try:
            versions.update(self.store, bump)
        except SweepExpired as e:
            self._lost = str(e)
            return
        self._renewed = sent

    def finish(self, now: float, expired: list[str]) -> None:
        """End the sweep: forget the deletions whose data it removed, and stamp with
        ``now`` those it found unstamped."""
        self._stop.set()

        def end(ix: Index) -> bool:
            if self.token not in ix.sweeps:
                # A retry after a lost response, or a commit took it for dead: either way
                # the sweep is over (its deletes are done); what is left waits for the next.
                return False
            for vid in expired:
                ix.deleted.pop(vid, None)
            del ix.sweeps[self.token]
            for vid in self._stamp:
                if ix.deleted.get(vid, 0) is None:
                    ix.deleted[vid] = now
            return True

        versions.update(self.store, end)
        self.token = ""

    def _withdraw(self, ix: Index) -> bool:
        return ix.sweeps.pop(self.token, None) is not None
