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
import math
import re
from dataclasses import dataclass, field
from typing import Any

from cloudckpt import codec, schema, tree
from cloudckpt.blobs.chunks import iter_chunks
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


_KEY = re.compile(rf"{PREFIX}/{schema.VID_PATTERN}\.json")
_MARKER_KEY = re.compile(rf"{MARKERS}/{schema.VID_PATTERN}")


def is_key(key_: str) -> bool:
    """Whether a listed key is a manifest's (of a plain version id)."""
    return _KEY.fullmatch(key_) is not None


def is_marker_key(key_: str) -> bool:
    return _MARKER_KEY.fullmatch(key_) is not None


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
    #: The content hash of the stored bytes this was parsed from ("" if not parsed).
    content_hash: str = ""

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
    def parse(cls, data: bytes | memoryview, where: str, digest: str | None = None) -> Manifest:
        """Parse and check a stored manifest: every field, entry and chunk reference and
        the state's skeleton; CorruptCheckpoint naming ``where`` if anything is wrong."""
        doc = schema.document(data, where)
        found = doc.get("format") if isinstance(doc, dict) else None
        if schema.format_of(doc, READS) is None:
            raise UnsupportedFormat(
                f"{where}: manifest format {found!r:.40} is not supported (this cloudckpt reads "
                f"{', '.join(map(str, READS))}); upgrade cloudckpt"
            )
        row_fields = set(Version.__dataclass_fields__)
        try:
            if "state" not in doc or "tensors" not in doc:
                raise schema.Invalid("lacks its state or tensors")
            tensors = schema.listing(_entry)(doc["tensors"])
            chunk_size = schema.count(doc.get("chunk_size") or 0)
            version = Version.from_dict({k: v for k, v in doc.items() if k in row_fields})
        except (schema.Invalid, CorruptCheckpoint) as e:
            raise CorruptCheckpoint(f"{where}: {e}") from None
        try:
            tree.unflatten(doc["state"], lambda i, path: _leaf(i, len(tensors), path))
        except CorruptCheckpoint as e:
            raise CorruptCheckpoint(f"{where}: {e}") from None
        extra = {k: v for k, v in doc.items() if k not in row_fields and k not in _OWN}
        return cls(
            version,
            doc["state"],
            tensors,
            chunk_size,
            extra,
            found,
            digest or codec.content_hash(data),
        )


def _leaf(index: int, known: int, path: str) -> None:
    if index >= known:
        raise CorruptCheckpoint(f"state node {path!r} names array {index} of {known}")


#: The most dimensions a stored array may have.
MAX_DIMS = 64


def check_entry(entry: Any) -> tuple[str, Any, tuple[int, ...]]:
    """Check an array entry of a manifest: its path, kind, an allowed dtype, its chunk
    references, and a shape whose byte size equals what its chunks hold. Returns
    ``(kind, dtype, shape)`` with the dtype as a torch or numpy dtype."""
    kind, name, shape = check_layout(entry)
    return kind, tree.numpy_dtype(name) if kind == "numpy" else tree.torch_dtype(name), shape


def check_layout(entry: Any) -> tuple[str, str, tuple[int, ...]]:
    """:func:`check_entry` without making the dtype (no torch import for the usual
    dtypes): ``(kind, dtype name, shape)``."""
    where = f"entry {entry.get('path') if isinstance(entry, dict) else entry!r:.80}"
    try:
        found = schema.fields(entry, _ENTRY)
        if set(found) != set(_ENTRY):
            raise schema.Invalid(f"lacks {sorted(set(_ENTRY) - set(found))}")
        shape = tuple(found["shape"])
        if len(shape) > MAX_DIMS:
            raise schema.Invalid(f"has {len(shape)} dimensions, more than {MAX_DIMS}")
        if math.prod(max(d, 1) for d in shape) > schema.MAX_INT // 16:
            # Even an empty array's strides must fit in 64 bits to be allocated.
            raise schema.Invalid(f"shape {list(shape)[:8]} has more elements than can exist")
    except schema.Invalid as e:
        raise CorruptCheckpoint(f"{where}: {e}") from None
    kind, name = found["kind"], found["dtype"]
    if kind not in ("numpy", "torch"):
        raise CorruptCheckpoint(f"{where} has unknown kind {kind!r:.40}")
    itemsize = tree.itemsize(kind, name)
    nbytes = 0
    for chunk in iter_chunks(entry):
        if chunk.stored > codec.max_stored(chunk.blob_size) or chunk.blob_size > codec.max_raw(
            chunk.stored
        ):
            raise CorruptCheckpoint(
                f"{where}: a blob of {chunk.stored} bytes cannot hold the {chunk.blob_size} "
                "bytes the entry claims"
            )
        nbytes += chunk.size
    expected = itemsize * math.prod(shape)
    if expected != nbytes:
        raise CorruptCheckpoint(
            f"{where}: chunks hold {nbytes} bytes but shape {list(shape)} needs {expected}"
        )
    return kind, name, shape


_ENTRY = {
    "path": schema.text,
    "kind": schema.text,
    "dtype": schema.text,
    "shape": schema.listing(schema.count),
}


def _entry(entry: Any) -> dict[str, Any]:
    try:
        check_layout(entry)
    except CorruptCheckpoint as e:
        raise schema.Invalid(str(e)) from None
    return entry


def read(store: Store, vid: str, expected: Version | None = None) -> Manifest:
    """The manifest of version ``vid``; CorruptCheckpoint if it is missing or malformed,
    or -- given the version's row in ``versions.json`` (``expected``) -- if it is not the
    manifest that row recorded."""
    where = store.url(key(vid))
    try:
        data = store.get_buffer(key(vid), limit=schema.MAX_DOCUMENT)
    except CheckpointNotFound:
        raise CorruptCheckpoint(f"{where} is missing: the repository is damaged") from None
    # The recorded hash first: an altered manifest is refused before it is even parsed.
    recorded = expected.manifest_hash if expected is not None else None
    digest = codec.content_hash(data)  # hashed once, here: parse records it
    if recorded and digest != recorded:
        raise CorruptCheckpoint(
            f"{where} was altered after its commit: its content does not match the hash "
            "versions.json records for it"
        )
    found = Manifest.parse(data, where, digest)
    if found.id and found.id != vid:
        raise CorruptCheckpoint(f"{where} names version {found.id!r}, not {vid!r}")
    if recorded and found.version != dataclasses.replace(expected, manifest_hash=None):
        raise CorruptCheckpoint(
            f"{where} and its row in versions.json disagree: one of them was altered"
        )
    return found
