"""Where blobs live and how a manifest entry refers to them: chunk records, validated."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cloudckpt.errors import CorruptCheckpoint


def blob_key(digest: str) -> str:
    return f"blobs/{digest[:2]}/{digest}"


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
