"""Garbage collection: mark everything live versions reach, sweep the rest when old.

Live: every version in ``versions.json``, every version deleted less than ``grace``
seconds ago (a reader may be loading it), and every manifest younger than ``grace`` (a
commit may be about to publish it). Only objects older than ``grace`` are swept, so a
blob a running commit uploaded or decided to reuse is never taken from under it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloudckpt import versions
from cloudckpt.blobs import iter_chunks
from cloudckpt.blobs.layout import MIN_GC_GRACE
from cloudckpt.errors import CorruptCheckpoint

if TYPE_CHECKING:
    from cloudckpt.repo import Repo

log = logging.getLogger("cloudckpt")

#: The default grace period: long enough for commits, reads and clock skew.
DEFAULT_GRACE = 2 * MIN_GC_GRACE


@dataclass
class GCReport:
    """What a garbage collection removed (or would remove, in a dry run)."""

    manifests: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_blobs: int = 0
    #: Incomplete multipart uploads aborted (left by writers that died mid-upload).
    aborted_uploads: int = 0
    dry_run: bool = False


def collect(repo: Repo, grace: float = DEFAULT_GRACE, dry_run: bool = False) -> GCReport:
    """Remove manifests and blobs that no live version reaches and that are older than
    ``grace`` seconds. A grace below ``MIN_GC_GRACE`` is for single-writer use (tests):
    it may sweep a blob a concurrent commit has just decided to reuse."""
    if grace < MIN_GC_GRACE:
        log.warning("gc with grace %.0fs < %.0fs: safe only with no concurrent writer", grace,
                    MIN_GC_GRACE)  # fmt: skip
    store = repo.store
    now = time.time()
    index = repo.index()
    live = set(index.versions) | {v for v, t in index.deleted.items() if now - t < grace}
    report = GCReport(dry_run=dry_run)
    marked: set[str] = set()
    for key, info in store.list_info("manifests").items():
        vid = key.rsplit("/", 1)[-1].removesuffix(".json")
        if vid in live or now - info.modified < grace:
            try:
                doc = repo._manifest(vid)
            except CorruptCheckpoint as e:
                if vid in index.versions:
                    raise  # never sweep what a damaged live manifest might still need
                log.warning("gc: skipping unreadable manifest %s: %s", key, e)
                continue
            marked.update(c.digest for entry in doc["tensors"] for c in iter_chunks(entry))
        else:
            report.manifests.append(key)
    for key, info in store.list_info("blobs").items():
        if key.rsplit("/", 1)[-1] in marked or now - info.modified < grace:
            report.kept_blobs += 1
            continue
        report.blobs.append(key)
        report.freed_bytes += info.size
    if not dry_run:
        # Blobs first: a manifest left without its blobs is never live, while a blob
        # left without its manifest is swept next time.
        store.delete(report.blobs)
        store.delete(report.manifests)
        report.aborted_uploads = store.abort_stale_uploads(now - grace)
        expired = [v for v, t in index.deleted.items() if now - t >= grace]
        if expired:
            versions.update(store, lambda ix: [ix.deleted.pop(v, None) for v in expired])
    log.info(
        "gc %s: %d manifests, %d blobs, %.1f MB %s; %d blobs kept",
        repo.uri, len(report.manifests), len(report.blobs), report.freed_bytes / 1e6,
        "would be freed" if dry_run else "freed", report.kept_blobs,
    )  # fmt: skip
    return report
