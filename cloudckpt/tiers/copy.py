"""A version copied from wherever its blobs are (a local tier, a peer) into a repository,
without its state ever being in memory whole.

Blobs are content-addressed, so the copy moves only what the destination lacks (the
parent's blobs and any it already stores are skipped); each blob is taken from the source
by its hash, checked against that hash here -- once, whatever the source: a damaged copy
raises CorruptCheckpoint and nothing is published -- encoded with the destination's codec
and stored. The version is then published by the destination's commit protocol, like any
other commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudckpt import codec, tree
from cloudckpt.blobs import TransferStats, blob_key, iter_chunks
from cloudckpt.blobs.batch import CHARGE, Batch
from cloudckpt.blobs.options import codec_for
from cloudckpt.commit import CommitRequest, Transaction
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.manifest import Manifest
from cloudckpt.versions import Version

if TYPE_CHECKING:
    import numpy as np

    from cloudckpt.repo import Repo

#: The raw bytes of a blob as a source holds them: ``(digest, raw size) -> bytes``, an
#: array the copy may keep. The copy checks them against the hash: a source need not
#: (and should not: twice is waste).
BlobSource = Callable[[str, int], "np.ndarray"]


@dataclass(frozen=True)
class _Blob:
    size: int
    dtype: str
    itemsize: int


def blobs_of(doc: Manifest) -> dict[str, _Blob]:
    """Every blob a manifest reads: its raw size and the dtype its bytes hold."""
    found: dict[str, _Blob] = {}
    for entry in doc.tensors:
        size = tree.itemsize(entry["kind"], entry["dtype"])
        for ref in iter_chunks(entry):
            blob = found.setdefault(ref.digest, _Blob(ref.blob_size, entry["dtype"], size))
            if blob.size != ref.blob_size:
                raise CorruptCheckpoint(f"manifest: blob {ref.digest} has conflicting sizes")
    return found


def copy_version(
    source: BlobSource,
    doc: Manifest,
    dst: Repo,
    branch: str,
    *,
    fence: int | None = None,
    meta: dict[str, Any] | None = None,
    before_publish: Callable[[], None] | None = None,
    origin: str = "the source",
) -> Version:
    """Publish ``doc``'s state on ``branch`` of ``dst``, its blobs read from ``source``.

    The new version keeps the step, metrics and message; ``meta`` is added to the
    recorded meta. ``before_publish`` runs right before publishing (a lease check).
    ``origin`` names the source in errors.
    """
    row = doc.version
    request = CommitRequest(
        branch, row.step, dict(row.metrics), row.message, {**row.meta, **(meta or {})}, False, fence
    )
    txn = Transaction(dst.store, dst.options.transfer, request, cache=dst.cache).begin()
    blobs = blobs_of(doc)
    stats = TransferStats(sum(ref.size for e in doc.tensors for ref in iter_chunks(e)))
    stored = _store(_checked(source, origin), blobs, dst, dict(txn.known), stats)
    entries = [_restamped(entry, stored) for entry in doc.tensors]

    def restore(missing: set[str]) -> None:
        again = {d: blobs[d] for d in missing}
        stored.update(_store(_checked(source, origin), again, dst, {}, TransferStats()))

    if before_publish is not None:
        before_publish()
    version = txn.publish(doc.state, entries, stats, extra=doc.extra, restore=restore)
    dst.last_stats = stats
    return version


def _checked(source: BlobSource, origin: str) -> BlobSource:
    """``source``, each blob's bytes checked against its size and hash."""

    def read(digest: str, size: int) -> np.ndarray:
        raw = source(digest, size)
        if memoryview(raw).nbytes != size or codec.content_hash(raw) != digest:
            raise CorruptCheckpoint(f"blob {digest} from {origin} fails its hash")
        return raw

    return read


def _store(
    source: BlobSource,
    blobs: dict[str, _Blob],
    dst: Repo,
    known: dict[str, int],
    stats: TransferStats,
) -> dict[str, int]:
    """Store each blob ``dst`` lacks, read from a checked ``source``; digest -> stored
    size for all of them."""
    t0 = time.perf_counter()
    options = dst.options.transfer
    coder = codec.Codec(options.compression_level)

    def one(digest: str, blob: _Blob) -> tuple[int, bool]:
        if digest in known:
            return known[digest], False
        info = dst.store.stat(blob_key(digest))
        if info is not None:
            return info.size, False
        raw = source(digest, blob.size)  # checked (_checked)
        choice = codec_for(options, blob.dtype, blob.itemsize, blob.size)
        data = coder.encode(memoryview(raw), choice)
        dst.store.put(blob_key(digest), data)
        if dst.cache is not None:
            dst.cache.put_later(digest, raw)  # off the upload's path
        return len(data), True

    with Batch(options.workers, "cloudckpt-copy", options.max_inflight_bytes) as batch:
        for digest, blob in blobs.items():
            if not batch.submit(digest, CHARGE * blob.size, one, digest, blob):
                break
        done = batch.results()
    sizes: dict[str, int] = {}
    for digest, (size, moved) in done.items():
        sizes[digest] = size
        stats.add_blob(size, moved)
    stats.seconds = time.perf_counter() - t0
    return sizes


def _restamped(entry: dict[str, Any], stored: dict[str, int]) -> dict[str, Any]:
    """``entry`` with each chunk's stored size as the destination stores its blob."""
    chunks = [[d, n, stored[d], at, size] for d, n, _, at, size in entry["chunks"]]
    return {**entry, "chunks": chunks}
