"""Loading: blobs are fetched in parallel, decoded straight into the destination
arrays' memory, and every blob's hash is checked after decompression."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cloudckpt import codec
from cloudckpt.blobs.layout import (
    CHARGE,
    ByteBudget,
    ChunkRef,
    Progress,
    blob_key,
    iter_chunks,
)
from cloudckpt.blobs.options import TransferOptions, TransferStats
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint
from cloudckpt.store import Store


@dataclass
class _Fetch:
    """One blob to download, and the places its bytes go."""

    digest: str
    stored: int
    size: int
    parts: list[tuple[str, Any, ChunkRef]] = field(default_factory=list)


def _fetches(targets: list[tuple[dict[str, Any], Any]]) -> dict[str, _Fetch]:
    """Group chunk references by blob: each blob is fetched once, whoever uses it."""
    fetches: dict[str, _Fetch] = {}
    for entry, dest in targets:
        for ref in iter_chunks(entry):
            fetch = fetches.setdefault(ref.digest, _Fetch(ref.digest, ref.stored, ref.blob_size))
            if (fetch.stored, fetch.size) != (ref.stored, ref.blob_size):
                raise CorruptCheckpoint(f"manifest: blob {ref.digest} has conflicting sizes")
            fetch.parts.append((entry["path"], dest, ref))
    return fetches


class BlobReader:
    """Downloads, decodes and verifies blobs into destination arrays."""

    def __init__(self, store: Store, options: TransferOptions) -> None:
        self.store = store
        self.options = options
        self.codec = codec.Codec(options.compression_level)

    def read(self, targets: list[tuple[dict[str, Any], Any]]) -> TransferStats:
        """Fill each ``(manifest entry, destination array)`` pair; returns the stats."""
        return self._transfer(_fetches(targets), "load", errors=None)

    def verify(self, entries: list[dict[str, Any]]) -> tuple[TransferStats, dict[str, str]]:
        """Download, decompress and hash every blob the entries use, keeping nothing;
        returns the stats and blob key -> what is wrong with it, for each bad blob."""
        errors: dict[str, str] = {}
        stats = self._transfer(_fetches([(e, None) for e in entries]), "verify", errors)
        return stats, errors

    def _transfer(
        self, fetches: dict[str, _Fetch], desc: str, errors: dict[str, str] | None
    ) -> TransferStats:
        t0 = time.perf_counter()
        stats = TransferStats(
            logical_bytes=sum(r.size for f in fetches.values() for _, _, r in f.parts)
        )
        budget = ByteBudget(self.options.max_inflight_bytes)
        progress = Progress(self.options.progress, stats.logical_bytes, desc)
        try:
            with ThreadPoolExecutor(self.options.workers, f"cloudckpt-{desc}") as pool:
                futures = []
                for fetch in fetches.values():
                    budget.acquire(CHARGE * fetch.size)
                    futures.append((fetch, pool.submit(self._load_blob, fetch, budget, progress)))
                for fetch, fut in futures:
                    try:
                        stats.transferred_bytes += fut.result()
                    except CorruptCheckpoint as e:
                        if errors is None:
                            raise
                        errors[blob_key(fetch.digest)] = str(e)
                    stats.transferred_blobs += 1
        finally:
            progress.close()
        stats.stored_bytes = stats.transferred_bytes
        stats.seconds = time.perf_counter() - t0
        return stats

    def _load_blob(self, fetch: _Fetch, budget: ByteBudget, progress: Progress) -> int:
        try:
            key = blob_key(fetch.digest)
            path0 = fetch.parts[0][0]
            where = f"{self.store.url(key)} (holding {path0!r})"
            try:
                blob = self.store.get_buffer(key)
            except CheckpointNotFound:
                raise CorruptCheckpoint(f"{where} is missing from the store") from None
            # Any encoding of the blob's bytes will do (writers with another dtype's codec
            # or level may have stored it); decoding and the hash check the rest.
            if len(blob) > codec.max_stored(fetch.size):
                raise CorruptCheckpoint(
                    f"{where}: {len(blob)} bytes stored, more than any encoding of its "
                    f"{fetch.size} bytes"
                )
            _, dest, ref = fetch.parts[0]
            direct = len(fetch.parts) == 1 and ref.size == fetch.size and dest is not None
            raw = _dest_bytes(dest, ref.offset, ref.size) if direct else None
            if raw is None:
                raw = np.empty(fetch.size, dtype=np.uint8)
            self.codec.decode_into(blob, raw, where)
            if codec.content_hash(raw) != fetch.digest:
                raise CorruptCheckpoint(f"{where}: content does not match its hash")
            for _, dest, ref in fetch.parts:
                if dest is not None and not (direct and _is_cpu(dest)):
                    _copy_into(dest, ref.offset, raw[ref.blob_offset : ref.blob_offset + ref.size])
            return len(blob)
        finally:
            budget.release(CHARGE * fetch.size)
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
