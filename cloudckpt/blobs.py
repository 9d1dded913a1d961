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

    Arrays of ``chunk_size`` bytes or more are cut into chunks of that size; arrays
    smaller than ``pack_below`` share blobs (packs) of up to ``chunk_size`` bytes.

    ``max_inflight_bytes`` bounds the memory the pipeline holds. A chunk in flight is
    charged twice its raw size (scratch and output while compressing; the blob and the
    HTTP client's copy while uploading), so the default lets two 64 MiB chunks or
    eight 16 MiB chunks move at once. Raise it on machines with memory to spare and
    fast networks.
    """

    chunk_size: int = 64 * MiB
    pack_below: int = 1 * MiB
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
    return [(a, min(a + step, nbytes)) for a in range(0, nbytes, step)]


def _bytes_of(value: Any) -> Callable[[int, int], np.ndarray]:
    """A function giving bytes [a, b) of an array as a uint8 numpy array on the CPU."""
    if isinstance(value, np.ndarray):
        flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        return lambda a, b: flat[a:b]
    t = value.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat_t = t.reshape(-1).view(torch.uint8)
    if flat_t.device.type == "cpu":
        flat = flat_t.numpy()
        return lambda a, b: flat[a:b]
    return lambda a, b: flat_t[a:b].cpu().numpy()


@dataclass
class _Planned:
    """One blob to write: byte ranges ``(leaf index, start, end)`` of one or more leaves."""

    pieces: list[tuple[int, int, int]]
    size: int = 0


def _plan(leaves: list[Leaf], chunk_size: int, pack_below: int) -> list[_Planned]:
    """Large leaves are cut into chunks; small ones are packed together into shared
    blobs, one pack per dtype so the dtype's codec still applies (one request instead of
    hundreds for biases, norms and step counters)."""
    planned: list[_Planned] = []
    packs: dict[tuple[str, str], _Planned] = {}
    small = min(pack_below, chunk_size)
    for i, leaf in enumerate(leaves):
        n = leaf.nbytes
        if n == 0:
            continue
        if n < small:
            pack = packs.get((leaf.kind, leaf.dtype))
            if pack is None or pack.size + n > chunk_size:
                pack = packs[(leaf.kind, leaf.dtype)] = _Planned([])
                planned.append(pack)
            pack.pieces.append((i, 0, n))
            pack.size += n
            continue
        for a, b in _chunk_bounds(n, leaf.itemsize, chunk_size):
            planned.append(_Planned([(i, a, b)], b - a))
    return planned


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
        """Upload every leaf's bytes; returns the manifest entries and the stats."""
        t0 = time.perf_counter()
        stats = TransferStats(logical_bytes=sum(leaf.nbytes for leaf in leaves))
        budget = _ByteBudget(self.options.max_inflight_bytes)
        progress = _Progress(self.options.progress, stats.logical_bytes, "save")
        entries = [_entry(leaf) for leaf in leaves]
        planned = _plan(leaves, self.options.chunk_size, self.options.pack_below)
        last_use = {i: n for n, blob in enumerate(planned) for i, _, _ in blob.pieces}
        getters: dict[int, Callable[[int, int], np.ndarray]] = {}
        jobs: list[tuple[_Planned, Future[tuple[str, int, bool]]]] = []
        try:
            with ThreadPoolExecutor(self.options.workers, "cloudckpt-save") as pool:
                for n, blob in enumerate(planned):
                    parts = []
                    for i, a, b in blob.pieces:
                        if i not in getters:
                            getters[i] = _bytes_of(leaves[i].value)
                        parts.append((getters[i], a, b))
                        if last_use[i] == n:  # the job keeps what it needs
                            del getters[i]
                    budget.acquire(_CHARGE * blob.size)
                    fut = pool.submit(self._save_blob, parts, blob, leaves, budget, progress)
                    jobs.append((blob, fut))
                for blob, fut in jobs:
                    digest, stored, uploaded = fut.result()
                    offset = 0
                    for i, a, b in blob.pieces:
                        entries[i]["chunks"].append([digest, b - a, stored, offset, blob.size])
                        offset += b - a
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

    def _save_blob(
        self,
        parts: list[tuple[Callable[[int, int], np.ndarray], int, int]],
        blob: _Planned,
        leaves: list[Leaf],
        budget: _ByteBudget,
        progress: _Progress,
    ) -> tuple[str, int, bool]:
        try:
            if len(parts) == 1:
                get, a, b = parts[0]
                raw = get(a, b)
            else:
                raw = np.concatenate([get(a, b) for get, a, b in parts])
            leaf = leaves[blob.pieces[0][0]]  # a pack holds one dtype
            choice = codec.choose(leaf.dtype, leaf.itemsize, raw.nbytes)
            digest = codec.content_hash(raw)
            with self._lock:
                stored = self._known.get(digest)
                claim = self._claims.get(digest) if stored is None else None
                mine = stored is None and claim is None
                if mine:
                    claim = self._claims[digest] = Future()
            if stored is not None:
                return digest, stored, False
            assert claim is not None
            if not mine:
                return digest, claim.result(), False
            try:
                stored, uploaded = self._upload(digest, raw, choice)
            except BaseException as e:
                claim.set_exception(e)
                raise
            claim.set_result(stored)
            with self._lock:
                self._known[digest] = stored
            return digest, stored, uploaded
        finally:
            budget.release(_CHARGE * blob.size)
            progress.update(blob.size)

    def _upload(self, digest: str, raw: np.ndarray, choice: codec.CodecChoice) -> tuple[int, bool]:
        key = blob_key(digest)
        existing = self.store.size_if_exists(key)
        if existing is not None:
            return existing, False
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


_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class ChunkRef:
    """Bytes ``[offset, offset + size)`` of an array, held at ``blob_offset`` in a blob."""

    digest: str
    offset: int
    size: int
    stored: int
    blob_offset: int
    blob_size: int


def iter_chunks(entry: dict[str, Any]) -> Iterator[ChunkRef]:
    """The chunks of a manifest entry, validated (a hostile manifest cannot name a key
    outside ``blobs/`` nor a range outside its blob)."""
    offset = 0
    for chunk in entry.get("chunks", ()):
        try:
            digest, size, stored, blob_offset, blob_size = chunk
            ok = (
                isinstance(digest, str)
                and len(digest) == 32
                and set(digest) <= _HEX
                and all(type(x) is int and x >= 0 for x in (size, stored, blob_offset, blob_size))
                and blob_offset + size <= blob_size
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CorruptCheckpoint(
                f"manifest entry {entry.get('path')!r}: malformed chunk {chunk!r}"
            )
        yield ChunkRef(digest, offset, size, stored, blob_offset, blob_size)
        offset += size


@dataclass
class _Fetch:
    """One blob to download, and the places its bytes go."""

    digest: str
    stored: int
    size: int
    parts: list[tuple[str, Any, ChunkRef]] = field(default_factory=list)


class BlobReader:
    """Downloads, decodes and verifies blobs into destination arrays."""

    def __init__(self, store: Store, options: TransferOptions) -> None:
        self.store = store
        self.options = options
        self.codec = codec.Codec(options.compression_level)

    def read(self, targets: list[tuple[dict[str, Any], Any]]) -> TransferStats:
        """Fill each ``(manifest entry, destination array)`` pair; returns the stats."""
        t0 = time.perf_counter()
        fetches: dict[str, _Fetch] = {}
        for entry, dest in targets:
            for ref in iter_chunks(entry):
                fetch = fetches.setdefault(
                    ref.digest, _Fetch(ref.digest, ref.stored, ref.blob_size)
                )
                if (fetch.stored, fetch.size) != (ref.stored, ref.blob_size):
                    raise CorruptCheckpoint(f"manifest: blob {ref.digest} has conflicting sizes")
                fetch.parts.append((entry["path"], dest, ref))
        stats = TransferStats(
            logical_bytes=sum(r.size for f in fetches.values() for _, _, r in f.parts)
        )
        budget = _ByteBudget(self.options.max_inflight_bytes)
        progress = _Progress(self.options.progress, stats.logical_bytes, "load")
        try:
            with ThreadPoolExecutor(self.options.workers, "cloudckpt-load") as pool:
                futures = []
                for fetch in fetches.values():
                    budget.acquire(_CHARGE * fetch.size)
                    futures.append(pool.submit(self._load_blob, fetch, budget, progress))
                for fut in futures:
                    stats.transferred_bytes += fut.result()
                    stats.transferred_blobs += 1
        finally:
            progress.close()
        stats.stored_bytes = stats.transferred_bytes
        stats.seconds = time.perf_counter() - t0
        return stats

    def _load_blob(self, fetch: _Fetch, budget: _ByteBudget, progress: _Progress) -> int:
        try:
            key = blob_key(fetch.digest)
            path0 = fetch.parts[0][0]
            where = f"{self.store.url(key)} (holding {path0!r})"
            try:
                blob = self.store.get(key)
            except CheckpointNotFound:
                raise CorruptCheckpoint(f"{where} is missing from the store") from None
            if len(blob) != fetch.stored:
                raise CorruptCheckpoint(
                    f"{where}: {len(blob)} bytes stored, manifest says {fetch.stored}"
                )
            _, dest, ref = fetch.parts[0]
            direct = len(fetch.parts) == 1 and ref.size == fetch.size
            raw = _dest_bytes(dest, ref.offset, ref.size) if direct else None
            if raw is None:
                raw = np.empty(fetch.size, dtype=np.uint8)
            self.codec.decode_into(blob, raw, where)
            if codec.content_hash(raw) != fetch.digest:
                raise CorruptCheckpoint(f"{where}: content does not match its hash")
            for _, dest, ref in fetch.parts:
                if not (direct and _is_cpu(dest)):
                    _copy_into(dest, ref.offset, raw[ref.blob_offset : ref.blob_offset + ref.size])
            return len(blob)
        finally:
            budget.release(_CHARGE * fetch.size)
            progress.update(fetch.size)


def _is_cpu(dest: Any) -> bool:
    return isinstance(dest, np.ndarray) or dest.device.type == "cpu"


def _copy_into(dest: Any, offset: int, data: np.ndarray) -> None:
    if _is_cpu(dest):
        _dest_bytes(dest, offset, data.size)[:] = data
    else:
        flat = dest.reshape(-1).view(torch.uint8)
        flat[offset : offset + data.size].copy_(torch.from_numpy(data))


def _dest_bytes(dest: Any, offset: int, size: int) -> np.ndarray | None:
    """Writable CPU bytes ``[offset, offset + size)`` of ``dest``; None if it is not on
    the CPU."""
    if isinstance(dest, np.ndarray):
        return dest.reshape(-1).view(np.uint8)[offset : offset + size]
    if dest.device.type != "cpu":
        return None
    return dest.reshape(-1).view(torch.uint8).numpy()[offset : offset + size]
