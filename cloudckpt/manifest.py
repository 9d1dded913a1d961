"""A version's manifest: the immutable record of one committed state.

``manifests/<version>.json`` holds the version's row (as in ``versions.json``), the
state's skeleton, and each array's chunks. ``published/<version>`` is written after the
version's publishing swap succeeded: it tells ``repair`` which manifests were
acknowledged commits and which were left by commits that never published (see
docs/protocol.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from cloudckpt.blobs.layout import iter_chunks
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint, UnsupportedFormat
from cloudckpt.store import Store
from cloudckpt.versions import Version

#: Written by this release. Format 1 (before published markers) is still read; repair
#: adopts a format-1 manifest without a marker, as that release did.
FORMAT = 2
READS = (1, 2)
PREFIX = "manifests"
MARKERS = "published"
#: Top-level fields of the document that are not the version row.
_OWN = ("format", "chunk_size", "state", "tensors")


def key(vid: str) -> str:
    return f"{PREFIX}/{vid}.json"


def marker_key(vid: str) -> str:
    return f"{MARKERS}/{vid}"


def vid_of(key_: str) -> str:
    """The version id of a manifest or marker key."""
    return key_.rsplit("/", 1)[-1].removesuffix(".json")


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: the version's row, the state skeleton and the array entries."""

    version: Version
    state: Any
    tensors: list[dict[str, Any]]
    chunk_size: int = 0
    #: Further top-level fields a writer added (e.g. ``dcp``: a DCP layout).
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    @property
    def id(self) -> str:
        return self.version.id

    def digests(self) -> set[str]:
        """Every blob this version reads."""
        return {c.digest for entry in self.tensors for c in iter_chunks(entry)}

    def stored_sizes(self) -> dict[str, int]:
        """Blob hash -> stored size, for every blob this version reads."""
        return {c.digest: c.stored for entry in self.tensors for c in iter_chunks(entry)}

    def encode(self) -> bytes:
        doc = {
            "format": self.format,
            **dataclasses.asdict(self.version),
            "chunk_size": self.chunk_size,
            "state": self.state,
            "tensors": self.tensors,
            **self.extra,
        }
        return json.dumps(doc).encode()

    @classmethod
    def parse(cls, data: bytes | memoryview, where: str) -> Manifest:
        try:
            doc = json.loads(bytes(data))
        except (ValueError, RecursionError) as e:
            raise CorruptCheckpoint(f"{where} is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise CorruptCheckpoint(f"{where}: a manifest must be a JSON object")
        if doc.get("format") not in READS:
            found = doc.get("format")
            raise UnsupportedFormat(
                f"{where}: manifest format {found!r} is not supported (this cloudckpt reads "
                f"{', '.join(map(str, READS))}); upgrade cloudckpt"
            )
        if not isinstance(doc.get("tensors"), list) or "state" not in doc:
            raise CorruptCheckpoint(f"{where}: manifest lacks its state or tensors")
        if not all(isinstance(e, dict) for e in doc["tensors"]):
            raise CorruptCheckpoint(f"{where}: manifest entries must be objects")
        row_fields = set(Version.__dataclass_fields__)
        try:
            version = Version.from_dict({k: v for k, v in doc.items() if k in row_fields})
            chunk_size = int(doc.get("chunk_size") or 0)
        except (CorruptCheckpoint, TypeError, ValueError) as e:
            raise CorruptCheckpoint(f"{where}: malformed version row ({e})") from None
        extra = {k: v for k, v in doc.items() if k not in row_fields and k not in _OWN}
        found = cls(version, doc["state"], doc["tensors"], chunk_size, extra, doc["format"])
        try:
            found.digests()  # every chunk reference checked once, here
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where}: {e}") from None
        return found


def read(store: Store, vid: str) -> Manifest:
    """The manifest of version ``vid``; CorruptCheckpoint if it is missing or malformed."""
    where = store.url(key(vid))
    try:
        data = store.get(key(vid))
    except CheckpointNotFound:
        raise CorruptCheckpoint(f"{where} is missing: the repository is damaged") from None
    found = Manifest.parse(data, where)
    if found.id and found.id != vid:
        raise CorruptCheckpoint(f"{where} names version {found.id!r}, not {vid!r}")
    return found
