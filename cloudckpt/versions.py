"""The versions manifest (``versions.json``): branches, tags and one row per version.

It is the only mutable object of a repository and changes only by compare-and-swap on
its ETag, so two writers never lose each other's update.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cloudckpt.errors import CommitConflict, CorruptCheckpoint, PreconditionFailed
from cloudckpt.store import Store

KEY = "versions.json"
FORMAT = 1


@dataclass(frozen=True)
class Version:
    """One committed version of the state, as recorded in ``versions.json``."""

    id: str
    branch: str
    parent: str | None = None
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    message: str | None = None
    created: float = 0.0
    logical_bytes: int = 0
    stored_bytes: int = 0
    uploaded_bytes: int = 0
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Version:
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in row.items() if k in known})
        except TypeError as e:
            raise CorruptCheckpoint(f"{KEY}: malformed version row ({e})") from None


@dataclass
class Index:
    """The parsed versions manifest."""

    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    versions: dict[str, Version] = field(default_factory=dict)
    #: Deleted version id -> when it was deleted. Its data stays until garbage
    #: collection, and for the grace period after deletion (readers mid-load).
    deleted: dict[str, float] = field(default_factory=dict)

    def dumps(self) -> bytes:
        doc = {
            "format": FORMAT,
            "branches": self.branches,
            "tags": self.tags,
            "versions": [asdict(v) for v in self.versions.values()],
            "deleted": self.deleted,
        }
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Index:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise CorruptCheckpoint(
                    f"{where}: format {doc.get('format')!r} is not supported by this cloudckpt "
                    f"(it reads format {FORMAT}); upgrade cloudckpt"
                )
            rows = [Version.from_dict(r) for r in doc["versions"]]
            rows.sort(key=lambda v: (v.created, v.id))
            deleted = {str(k): float(v) for k, v in doc.get("deleted", {}).items()}
            return cls(dict(doc["branches"]), dict(doc["tags"]), {v.id: v for v in rows}, deleted)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptCheckpoint(
                f"{where} is not a valid versions manifest ({e}); `repair` rebuilds it from "
                "the manifests"
            ) from None

    def latest(self) -> Version | None:
        return max(self.versions.values(), key=lambda v: (v.created, v.id), default=None)


def read(store: Store) -> tuple[Index, str | None]:
    """The current index and its ETag (an empty index and None in a new repository)."""
    found = store.read_versioned(KEY)
    if found is None:
        return Index(), None
    return Index.parse(found[0], store.url(KEY)), found[1]


def update(store: Store, change: Callable[[Index], bool | None], attempts: int = 32) -> Index:
    """Apply ``change`` to the index and swap it in; retried on lost races.

    ``change`` sees the freshest index each time and may raise (e.g. CommitConflict)
    to give up, or return False when the index already holds the change: a swap whose
    response was lost took effect, and its retry must not apply the change twice.
    """
    for attempt in range(attempts):
        index, etag = read(store)
        if change(index) is False:
            return index
        try:
            store.put_if_match(KEY, index.dumps(), etag)
            return index
        except PreconditionFailed:
            time.sleep(random.uniform(0, min(2.0, 0.01 * 2**attempt)))
    raise CommitConflict(
        f"{store.url(KEY)} kept changing under {attempts} attempts to update it: too many "
        "writers on this repository at once; retry"
    )
