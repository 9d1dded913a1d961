"""Saving: arrays -> chunks and packs -> content-addressed, compressed blobs.

Each array is cut into fixed-size chunks (small arrays share per-dtype packs); a thread
pool hashes each blob, skips it if the store already holds that hash, else compresses
and uploads it. The memory held by blobs in flight is bounded (``max_inflight_bytes``),
so memory while saving is the live state plus that bound -- never a serialized copy of
the whole state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from cloudckpt import codec
from cloudckpt.blobs.batch import CHARGE, Batch
from cloudckpt.blobs.cache import BlobCache
from cloudckpt.blobs.chunks import blob_key
from cloudckpt.blobs.options import TransferOptions, TransferStats, codec_for
from cloudckpt.blobs.progress import Progress
from cloudckpt.store import Store
from cloudckpt.tree import Leaf

if TYPE_CHECKING:  # imported where bytes are moved, not at import
    import numpy as np


def _chunk_bounds(nbytes: int, itemsize: int, chunk_size: int) -> list[tuple[int, int]]:
    step = max(itemsize, chunk_size - chunk_size % itemsize)
    return [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)]


class Bytes(NamedTuple):
    """Bytes ``[a, b)`` of an array as a uint8 numpy array on the CPU (``get(a, b)``),
    and whether they are a copy (``owned``: no one else writes to it) or a view of the
    caller's memory."""

    get: Callable[[int, int], np.ndarray]
    owned: bool


def _bytes_of(value: Any) -> Bytes:
    """The bytes of ``value``, a numpy array or a tensor on any device."""
    import numpy as np
    import torch

    if isinstance(value, np.ndarray):
        flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        return Bytes(lambda a, b: flat[a:b], False)
    t = value.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat_t = t.reshape(-1).view(torch.uint8)
    if flat_t.device.type == "cpu":
        flat = flat_t.numpy()
        return Bytes(lambda a, b: flat[a:b], False)
    return Bytes(lambda a, b: flat_t[a:b].cpu().numpy(), True)


@dataclass
class Planned:
    """One blob to write: byte ranges ``(leaf index, start, end)`` of one or more leaves."""

    pieces: list[tuple[int, int, int]]
    size: int = 0


class BlobResult(NamedTuple):
    """A blob as stored: its hash, stored size, and whether this save uploaded it."""

    digest: str
    stored: int
    uploaded: bool


def assemble(
    leaves: list[Leaf], planned: list[Planned], results: dict[int, BlobResult]
) -> tuple[list[dict[str, Any]], TransferStats]:
    """The manifest entries and stats of a save, from every planned blob's result."""
    stats = TransferStats(logical_bytes=sum(leaf.nbytes for leaf in leaves))
    entries = [_entry(leaf) for leaf in leaves]
    for n, blob in enumerate(planned):
        digest, stored, uploaded = results[n]
        offset = 0
        for i, a, b in blob.pieces:
            entries[i]["chunks"].append([digest, b - a, stored, offset, blob.size])
            offset += b - a
        stats.add_blob(stored, uploaded)
    return entries, stats


def _plan(leaves: list[Leaf], chunk_size: int, pack_below: int) -> list[Planned]:
    """Large leaves are cut into chunks; small ones are packed together into shared
    blobs, one pack per dtype so the dtype's codec still applies (one request instead of
    hundreds for biases, norms and step counters)."""
    planned: list[Planned] = []
    packs: dict[tuple[str, str], Planned] = {}
    small = min(pack_below, chunk_size)
    for i, leaf in enumerate(leaves):
        n = leaf.nbytes
        if n == 0:
            continue
        if n < small:
            pack = packs.get((leaf.kind, leaf.dtype))
            if pack is None or pack.size + n > chunk_size:
                pack = packs[(leaf.kind, leaf.dtype)] = Planned([])
                planned.append(pack)
            pack.pieces.append((i, 0, n))
            pack.size += n
            continue
        for a, b in _chunk_bounds(n, leaf.itemsize, chunk_size):
            planned.append(Planned([(i, a, b)], b - a))
    return planned


class BlobWriter:
    """Uploads the chunks of arrays that the store does not hold yet.

    ``known`` maps blob hashes the store is known to hold (e.g. from the parent
    version's manifest) to their stored size; they are neither checked nor uploaded.
    With a ``cache``, the raw bytes of every blob are kept there too, once the blob is
    stored (see :meth:`_keep`).
    """

    def __init__(
        self,
        store: Store,
        options: TransferOptions,
        known: dict[str, int] | None = None,
        cache: BlobCache | None = None,
    ) -> None:
        self.store = store
        self.options = options
        self.cache = cache
        self.codec = codec.Codec(options.compression_level)
        self._known = dict(known or {})
        self._claims: dict[str, Future[int]] = {}
        self._lock = threading.Lock()

    def write(self, leaves: list[Leaf]) -> tuple[list[dict[str, Any]], TransferStats]:
        """Upload every leaf's bytes; returns the manifest entries and the stats."""
        t0 = time.perf_counter()
        planned = self.plan(leaves)
        results = self.upload(leaves, planned)
        entries, stats = assemble(leaves, planned, results)
        stats.seconds = time.perf_counter() - t0
        return entries, stats

    def plan(self, leaves: list[Leaf]) -> list[Planned]:
        """The blobs the leaves are cut into, the same on every call (and every rank)."""
        return _plan(leaves, self.options.chunk_size, self.options.pack_below)

    def upload(
        self, leaves: list[Leaf], planned: list[Planned], only: Iterable[int] | None = None
    ) -> dict[int, BlobResult]:
        """Store the planned blobs (only those numbered in ``only``, if given: this
        rank's share); returns blob number -> what was stored."""
        chosen = list(range(len(planned))) if only is None else sorted(only)
        total = sum(planned[n].size for n in chosen)
        progress = Progress(self.options.progress, total, "save")
        last_use = {i: n for n in chosen for i, _, _ in planned[n].pieces}
        getters: dict[int, Bytes] = {}
        try:
            with Batch(
                self.options.workers, "cloudckpt-save", self.options.max_inflight_bytes
            ) as batch:
                for n in chosen:
                    blob = planned[n]
                    parts = []
                    for i, a, b in blob.pieces:
                        if i not in getters:
                            getters[i] = _bytes_of(leaves[i].value)
                        parts.append((getters[i], a, b))
                        if last_use[i] == n:  # the job keeps what it needs
                            del getters[i]
                    args = (parts, blob, leaves, batch, progress)
                    if not batch.submit(n, CHARGE * blob.size, self._save_blob, *args):
                        break  # a blob failed for good: results() raises it
                return batch.results()
        finally:
            progress.close()

    def _save_blob(
        self,
        parts: list[tuple[Bytes, int, int]],
        blob: Planned,
        leaves: list[Leaf],
        batch: Batch,
        progress: Progress,
    ) -> BlobResult:
        try:
            leaf = leaves[blob.pieces[0][0]]  # a pack holds one dtype
            with batch.gate.inside():  # the arrays are the caller's: not after a failure
                if len(parts) == 1:
                    source, a, b = parts[0]
                    raw, owned = source.get(a, b), source.owned
                else:
                    import numpy as np

                    raw, owned = np.concatenate([s.get(a, b) for s, a, b in parts]), True
                choice = codec_for(self.options, leaf.dtype, leaf.itemsize, raw.nbytes)
                digest = codec.content_hash(raw)
            result = self._store_blob(digest, raw, choice, batch)
            self._keep(digest, raw, owned, batch)
            return result
        finally:
            progress.update(blob.size)

    def _keep(self, digest: str, raw: np.ndarray, owned: bool, batch: Batch) -> None:
        """Keep the blob's raw bytes in the cache, once it is stored (a failed save
        writes none). A copy is written in the background: the save does not wait. A
        view of the caller's arrays is written now, inside the gate: it must not be read
        after the save returned or failed (and a copy to write later costs about as
        much as the write)."""
        if self.cache is None:
            return
        if owned:
            self.cache.put_later(digest, raw)
            return
        with batch.gate.inside():
            self.cache.put(digest, raw)

    def _store_blob(
        self, digest: str, raw: np.ndarray, choice: codec.CodecChoice, batch: Batch
    ) -> BlobResult:
        """Upload the blob unless the store holds it or another job of this save is
        uploading it."""
        with self._lock:
            stored = self._known.get(digest)
            claim = self._claims.get(digest) if stored is None else None
            mine = stored is None and claim is None
            if mine:
                claim = self._claims[digest] = Future()
        if stored is not None:
            return BlobResult(digest, stored, False)
        assert claim is not None
        if not mine:
            return BlobResult(digest, claim.result(), False)
        try:
            stored, uploaded = self._upload(digest, raw, choice, batch)
        except BaseException as e:
            claim.set_exception(e)
            raise
        claim.set_result(stored)
        with self._lock:
            self._known[digest] = stored
        return BlobResult(digest, stored, uploaded)

    def _upload(
        self, digest: str, raw: np.ndarray, choice: codec.CodecChoice, batch: Batch
    ) -> tuple[int, bool]:
        key = blob_key(digest)
        existing = self.store.stat(key)
        # Even an orphan that garbage collection is about to sweep may be reused: the
        # commit checks its blobs before publishing if a collection ran (cloudckpt.commit).
        if existing is not None:
            return existing.size, False
        with batch.gate.inside():  # ``raw`` may be a view of the caller's array
            blob = self.codec.encode(memoryview(raw), choice)
        self.store.put(key, blob)
        return len(blob), True


def _entry(leaf: Leaf) -> dict[str, Any]:
    return {
        "path": leaf.path,
        "kind": leaf.kind,
        "dtype": leaf.dtype,
        "shape": list(leaf.shape),
        "chunks": [],
    }
