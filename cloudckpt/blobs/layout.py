"""Where blobs live, how a manifest refers to them, and the pipeline's memory budget."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from cloudckpt.errors import CorruptCheckpoint

#: Memory charged per raw byte of a chunk in flight (see TransferOptions).
CHARGE = 2


def blob_key(digest: str) -> str:
    return f"blobs/{digest[:2]}/{digest}"


class ByteBudget:
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


class Progress:
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
    chunks = entry.get("chunks", []) if isinstance(entry, dict) else None
    if not isinstance(chunks, list):
        raise CorruptCheckpoint(f"manifest entry: malformed chunk list {chunks!r:.100}")
    for chunk in chunks:
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
