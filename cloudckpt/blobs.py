"""Array bytes <-> content-addressed, compressed chunk blobs: the transfer pipeline.

Saving: each array is cut into fixed-size chunks; a thread pool hashes each chunk,
skips it if the store already holds that hash, else compresses and uploads it. The
memory held by chunks in flight is bounded (``max_inflight_bytes``), so memory while
saving is the live state plus that bound -- never a serialized copy of the whole state.

Loading: chunks are fetched in parallel and decoded straight into the destination
array's memory; every chunk's hash is checked after decompression.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cloudckpt import codec
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint
from cloudckpt.store import Store
from cloudckpt.tree import Leaf

log = logging.getLogger("cloudckpt")

MiB = 1 << 20


def _default_workers() -> int:
    return max(4, min(32, 4 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class TransferOptions:
    """How arrays are cut, compressed and moved.

    ``max_inflight_bytes`` bounds the memory the pipeline holds. A chunk in flight is
    charged twice its raw size (scratch and output while compressing; the blob and the
    HTTP client's copy while uploading), so the default lets two 64 MiB chunks or
    eight 16 MiB chunks move at once. Raise it on machines with memory to spare and
    fast networks.
    """

    chunk_size: int = 64 * MiB
    max_inflight_bytes: int = 256 * MiB
    workers: int = field(default_factory=_default_workers)
    compression_level: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.max_inflight_bytes < 1 or self.workers < 1:
            raise ValueError("chunk_size, max_inflight_bytes and workers must be positive")


@dataclass
class TransferStats:
    """What one save or load moved."""

    logical_bytes: int = 0
    stored_bytes: int = 0
    transferred_bytes: int = 0
    transferred_blobs: int = 0
    reused_blobs: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


#: Memory charged per raw byte of a chunk in flight (see TransferOptions).
_CHARGE = 2


def blob_key(digest: str) -> str:
    return f"blobs/{digest[:2]}/{digest}"


class _ByteBudget:
    """A counting semaphore in bytes; one oversized request may run alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def _chunk_bounds(nbytes: int, itemsize: int, chunk_size: int) -> list[tuple[int, int]]:
    step = max(itemsize, chunk_size - chunk_size % itemsize)
    return [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)] or [(0, 0)]


def _bytes_of(value: Any) -> tuple[Callable[[int, int], np.ndarray], Any]:
    """A function giving bytes [a, b) of an array as a uint8 numpy array on the CPU."""
    if isinstance(value, np.ndarray):
        flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        return (lambda a, b: flat[a:b]), flat
    t = value.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat_t = t.reshape(-1).view(torch.uint8)
    if flat_t.device.type == "cpu":
        flat = flat_t.numpy()
        return (lambda a, b: flat[a:b]), flat
    return (lambda a, b: flat_t[a:b].cpu().numpy()), flat_t


class _Progress:
    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc) if enabled else None
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class BlobWriter:
    """Uploads the chunks of arrays that the store does not hold yet.

    ``known`` maps blob hashes the store is known to hold (e.g. from the parent
    version's manifest) to their stored size; they are neither checked nor uploaded.
    """

    def __init__(
        self, store: Store, options: TransferOptions, known: dict[str, int] | None = None
    ) -> None:
        self.store = store
        self.options = options
        self.codec = codec.Codec(options.compression_level)
        self._known = dict(known or {})
        self._claims: dict[str, Future[int]] = {}
        self._lock = threading.Lock()

    def write(self, leaves: list[Leaf]) -> tuple[list[dict[str, Any]], TransferStats]:
        """Upload every leaf's chunks; returns the manifest entries and the stats."""
        t0 = time.perf_counter()
        stats = TransferStats(logical_bytes=sum(leaf.nbytes for leaf in leaves))
        budget = _ByteBudget(self.options.max_inflight_bytes)
        progress = _Progress(self.options.progress, stats.logical_bytes, "save")
        entries: list[dict[str, Any]] = []
        jobs: list[tuple[list[Any], Future[tuple[str, int, int, bool]]]] = []
        try:
            with ThreadPoolExecutor(self.options.workers, "cloudckpt-save") as pool:
                for leaf in leaves:
                    chunks: list[Any] = []
                    entries.append(_entry(leaf, chunks))
                    get, _keep = _bytes_of(leaf.value)
                    for a, b in _chunk_bounds(leaf.nbytes, leaf.itemsize, self.options.chunk_size):
                        budget.acquire(_CHARGE * (b - a))
                        fut = pool.submit(self._save_chunk, get, a, b, leaf, budget, progress)
                        jobs.append((chunks, fut))
                for chunks, fut in jobs:
                    digest, size, stored, uploaded = fut.result()
                    chunks.append([digest, size, stored])
                    stats.stored_bytes += stored
                    if uploaded:
                        stats.transferred_blobs += 1
                        stats.transferred_bytes += stored
                    else:
                        stats.reused_blobs += 1
        finally:
            progress.close()
        stats.seconds = time.perf_counter() - t0
        return entries, stats

    def _save_chunk(
        self,
        get: Callable[[int, int], np.ndarray],
        a: int,
        b: int,
        leaf: Leaf,
        budget: _ByteBudget,
        progress: _Progress,
    ) -> tuple[str, int, int, bool]:
        try:
            raw = get(a, b)
            digest = codec.content_hash(raw)
            with self._lock:
                stored = self._known.get(digest)
                claim = self._claims.get(digest) if stored is None else None
                mine = stored is None and claim is None
                if mine:
                    claim = self._claims[digest] = Future()
            if stored is not None:
                return digest, b - a, stored, False
            assert claim is not None
            if not mine:
                return digest, b - a, claim.result(), False
            try:
                stored, uploaded = self._upload(digest, raw, leaf)
            except BaseException as e:
                claim.set_exception(e)
                raise
            claim.set_result(stored)
            with self._lock:
                self._known[digest] = stored
            return digest, b - a, stored, uploaded
        finally:
            budget.release(_CHARGE * (b - a))
            progress.update(b - a)

    def _upload(self, digest: str, raw: np.ndarray, leaf: Leaf) -> tuple[int, bool]:
        key = blob_key(digest)
        if self.store.exists(key):
            return self.store.size(key), False
        choice = codec.choose(leaf.dtype, leaf.itemsize, raw.nbytes)
        blob = self.codec.encode(memoryview(raw), choice)
        self.store.put(key, blob)
        return len(blob), True


def _entry(leaf: Leaf, chunks: list[Any]) -> dict[str, Any]:
    return {
        "path": leaf.path,
        "kind": leaf.kind,
        "dtype": leaf.dtype,
        "shape": list(leaf.shape),
        "chunks": chunks,
    }


def iter_chunks(entry: dict[str, Any]) -> Iterator[tuple[str, int, int, int]]:
    """(hash, offset, raw size, stored size) of each chunk of a manifest entry."""
    offset = 0
    for digest, size, stored in entry["chunks"]:
        yield digest, offset, size, stored
        offset += size


class BlobReader:
    """Downloads, decodes and verifies chunks into destination arrays."""

    def __init__(self, store: Store, options: TransferOptions) -> None:
        self.store = store
        self.options = options
        self.codec = codec.Codec(options.compression_level)

    def read(self, targets: list[tuple[dict[str, Any], Any]]) -> TransferStats:
        """Fill each ``(manifest entry, destination array)`` pair; returns the stats."""
        t0 = time.perf_counter()
        stats = TransferStats()
        budget = _ByteBudget(self.options.max_inflight_bytes)
        total = sum(size for entry, _ in targets for _, _, size, _ in iter_chunks(entry))
        progress = _Progress(self.options.progress, total, "load")
        try:
            with ThreadPoolExecutor(self.options.workers, "cloudckpt-load") as pool:
                futures = []
                for entry, dest in targets:
                    for chunk in iter_chunks(entry):
                        budget.acquire(_CHARGE * chunk[2])
                        futures.append(
                            pool.submit(self._load_chunk, entry, dest, chunk, budget, progress)
                        )
                for fut in futures:
                    stored = fut.result()
                    stats.transferred_blobs += 1
                    stats.transferred_bytes += stored
        finally:
            progress.close()
        stats.logical_bytes = total
        stats.stored_bytes = stats.transferred_bytes
        stats.seconds = time.perf_counter() - t0
        return stats

    def _load_chunk(
        self,
        entry: dict[str, Any],
        dest: Any,
        chunk: tuple[str, int, int, int],
        budget: _ByteBudget,
        progress: _Progress,
    ) -> int:
        digest, offset, size, stored = chunk
        try:
            key = blob_key(digest)
            where = f"{self.store.url(key)} (chunk of {entry['path']!r})"
            try:
                blob = self.store.get(key)
            except CheckpointNotFound:
                raise CorruptCheckpoint(f"{where} is missing from the store") from None
            if len(blob) != stored:
                raise CorruptCheckpoint(
                    f"{where}: {len(blob)} bytes stored, manifest says {stored}"
                )
            out = _dest_bytes(dest, offset, size)
            self.codec.decode_into(blob, out, where)
            if codec.content_hash(out) != digest:
                raise CorruptCheckpoint(f"{where}: content does not match its hash")
            if isinstance(dest, torch.Tensor) and dest.device.type != "cpu":
                dest.reshape(-1).view(torch.uint8)[offset : offset + size].copy_(
                    torch.from_numpy(out)
                )
            return len(blob)
        finally:
            budget.release(_CHARGE * size)
            progress.update(size)


def _dest_bytes(dest: Any, offset: int, size: int) -> np.ndarray:
    """Writable CPU bytes for ``[offset, offset + size)`` of ``dest`` (a scratch buffer
    when ``dest`` is on an accelerator)."""
    if isinstance(dest, np.ndarray):
        return dest.reshape(-1).view(np.uint8)[offset : offset + size]
    if dest.device.type != "cpu":
        return np.empty(size, dtype=np.uint8)
    return dest.reshape(-1).view(torch.uint8).numpy()[offset : offset + size]
