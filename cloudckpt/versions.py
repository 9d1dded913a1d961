"""The versions manifest (``versions.json``): branches, tags and one row per version.

It is the only mutable object of a repository and changes only by compare-and-swap on
its ETag, so two writers never lose each other's update. Besides the rows it holds what
the protocol's safety rests on (see docs/protocol.md): each branch's fencing token and
the garbage collector's epoch and running sweeps.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from cloudckpt import schema
from cloudckpt.errors import (
    CommitConflict,
    CorruptCheckpoint,
    FencedOut,
    PreconditionFailed,
    UnsupportedFormat,
)
from cloudckpt.store import Store

KEY = "versions.json"
#: Written by this release; format 1 (no fences, no gc state) is still read and upgraded
#: on the next write. An older cloudckpt refuses format 2 instead of dropping its fields.
FORMAT = 2
READS = (1, 2)


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
    #: The writer lease's fencing token the commit carried (None: committed without one).
    fence: int | None = None
    #: The content hash of the version's manifest, recorded in ``versions.json`` (None in
    #: the manifest itself, and for versions of earlier releases): a manifest altered
    #: after its commit is refused.
    manifest_hash: str | None = None

    @classmethod
    def from_dict(cls, row: Any) -> Version:
        """A row as stored; raises schema.Invalid if a field is missing or malformed."""
        found = schema.fields(row, _ROW)
        for required in ("id", "branch"):
            if required not in found:
                raise schema.Invalid(f"{required}: missing")
        return cls(**found)


_ROW: dict[str, Callable[[Any], Any]] = {
    "id": schema.vid,
    "branch": schema.name,
    "parent": schema.optional(schema.vid),
    "step": schema.optional(schema.integer),
    "metrics": schema.mapping(schema.text, schema.metric),
    "message": schema.optional(schema.text),
    "created": schema.timestamp,
    "logical_bytes": schema.count,
    "stored_bytes": schema.count,
    "uploaded_bytes": schema.count,
    "seconds": schema.number,
    "meta": schema.mapping(schema.text, schema.plain),
    "fence": schema.optional(schema.count),
    "manifest_hash": schema.optional(schema.digest),
}


#: The longest ttl a garbage collection's sweep may have: commits wait up to this long
#: for a sweep that died.
MAX_SWEEP_TTL = 300.0


@dataclass(frozen=True)
class Sweep:
    """A garbage collection in its sweep phase: renewed (``seq`` bumped) every ``ttl``/3
    seconds while it runs; one whose ``seq`` stood still for ``ttl`` is dead."""

    seq: int = 0
    ttl: float = 60.0


def _sweep(doc: Any) -> Sweep:
    found = schema.fields(doc, {"seq": schema.count, "ttl": schema.number})
    sweep = Sweep(**found)
    if not 0 < sweep.ttl <= MAX_SWEEP_TTL:
        raise schema.Invalid(f"ttl {sweep.ttl} is not in (0, {MAX_SWEEP_TTL:.0f}] seconds")
    return sweep


#: The fields of a deleted version's row kept in ``pruned``: its place in the history.
PRUNED_FIELDS = ("id", "branch", "parent", "step", "metrics", "created")
#: The most pruned rows kept; the oldest go first (their descendants then start the
#: history, as after a deletion before this release).
MAX_PRUNED = 10_000


def _newest_pruned(rows: list[Version]) -> dict[str, Version]:
    """The pruned rows by id, oldest first, at most :data:`MAX_PRUNED` of the newest (an
    index written by anyone else is held to the cap on reading, and so on every write)."""
    rows = sorted(rows, key=lambda v: (v.created, v.id))[-MAX_PRUNED:]
    return {v.id: v for v in rows}


def pruned_row(row: Version) -> Version:
    """What ``pruned`` keeps of a deleted version: lineage, step, metrics and time."""
    return Version(**{k: getattr(row, k) for k in PRUNED_FIELDS})


_GC = {
    "epoch": schema.count,
    "sweeps": schema.mapping(schema.text, _sweep),
    "waiting": schema.mapping(schema.text, _sweep),
}
_INDEX: dict[str, Callable[[Any], Any]] = {
    "branches": schema.mapping(schema.name, schema.vid),
    "tags": schema.mapping(schema.name, schema.vid),
    "versions": schema.listing(Version.from_dict),
    "deleted": schema.mapping(schema.vid, schema.optional(schema.timestamp)),
    "fences": schema.mapping(schema.name, schema.count),
    "gc": lambda doc: schema.fields(doc, _GC),
    "pruned": schema.listing(Version.from_dict),
}


@dataclass
class Index:
    """The parsed versions manifest."""

    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    versions: dict[str, Version] = field(default_factory=dict)
    #: Deleted version id -> when it was deleted, by the store's clock (None until the
    #: next garbage collection stamps it). Its data stays for ``grace`` after that stamp
    #: (readers mid-load).
    deleted: dict[str, float | None] = field(default_factory=dict)
    #: Branch -> fencing token of its writer lease; bumped by each new lease holder.
    fences: dict[str, int] = field(default_factory=dict)
    #: Bumped by every garbage collection as it starts its sweep: a commit that saw
    #: another epoch at its start checks its blobs before it publishes.
    gc_epoch: int = 0
    #: Garbage collections sweeping now, by token.
    sweeps: dict[str, Sweep] = field(default_factory=dict)
    #: Commits waiting to publish after a collection, by token: no collection registers
    #: its sweep while one is alive (``cloudckpt.turns``; fairness, not safety).
    waiting: dict[str, Sweep] = field(default_factory=dict)
    #: Deleted versions' rows (:data:`PRUNED_FIELDS` only), oldest first, so that the
    #: history (``log``, ``plot``) keeps their lineage and metrics; their data is gone.
    #: Optional in the file: older releases ignore it (and drop it when they write).
    pruned: dict[str, Version] = field(default_factory=dict)

    def prune(self, row: Version) -> None:
        """Keep a deleted version's place in the history (at most :data:`MAX_PRUNED`)."""
        self.pruned[row.id] = pruned_row(row)
        for old in list(self.pruned)[: max(0, len(self.pruned) - MAX_PRUNED)]:
            del self.pruned[old]

    def history(self) -> dict[str, Version]:
        """Live and pruned versions by id, oldest first: the whole run."""
        rows = {**self.pruned, **self.versions}
        return dict(sorted(rows.items(), key=lambda kv: (kv[1].created, kv[0])))

    def dumps(self) -> bytes:
        doc = {
            "format": FORMAT,
            "branches": self.branches,
            "tags": self.tags,
            "versions": [asdict(v) for v in self.versions.values()],
            "deleted": self.deleted,
            "fences": self.fences,
            "gc": {
                "epoch": self.gc_epoch,
                "sweeps": {k: asdict(s) for k, s in self.sweeps.items()},
                "waiting": {k: asdict(s) for k, s in self.waiting.items()},
            },
        }
        if self.pruned:
            doc["pruned"] = [
                {k: getattr(v, k) for k in PRUNED_FIELDS} for v in self.pruned.values()
            ]
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes | memoryview, where: str) -> Index:
        try:
            doc = schema.parse_json(data)
            if schema.format_of(doc, READS) is None:
                found = doc.get("format") if isinstance(doc, dict) else None
                raise UnsupportedFormat(
                    f"{where}: format {found!r:.40} is not supported by this cloudckpt (it "
                    f"reads formats {', '.join(map(str, READS))}); upgrade cloudckpt"
                )
            top = schema.fields(doc, _INDEX)
            for required in ("branches", "tags", "versions"):
                if required not in top:
                    raise schema.Invalid(f"{required}: missing")
            gc = top.get("gc", {})
            rows = top["versions"]
            known = {row.id for row in rows}
            for kind in ("branches", "tags"):
                for ref, vid in top[kind].items():
                    if vid not in known:
                        raise schema.Invalid(f"{kind}: {ref!r} names {vid!r}, which has no row")
            rows.sort(key=lambda v: (v.created, v.id))
            return cls(
                top["branches"],
                top["tags"],
                {v.id: v for v in rows},
                top.get("deleted", {}),
                top.get("fences", {}),
                gc.get("epoch", 0),
                gc.get("sweeps", {}),
                gc.get("waiting", {}),
                _newest_pruned(top.get("pruned", [])),
            )
        except schema.Invalid as e:
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
        store.check_root()  # a missing bucket is not an empty repository
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


def lineage(index: Index, vid: str) -> Iterator[Version]:
    """The version ``vid`` and its ancestors, newest first, by parent links; a missing
    (deleted) ancestor ends it, and so does a cycle (a hostile index)."""
    seen: set[str] = set()
    row = index.versions.get(vid)
    while row is not None and row.id not in seen:
        yield row
        seen.add(row.id)
        row = index.versions.get(row.parent) if row.parent else None


def descends(index: Index, vid: str, ancestor: str) -> bool:
    """Whether ``ancestor`` is ``vid`` itself or reached from it by parent links."""
    return any(row.id == ancestor for row in lineage(index, vid))


def check_fence(index: Index, branch: str, fence: int | None, where: str, refused: str) -> None:
    """Raise FencedOut unless ``fence`` (None: not fenced) is still ``branch``'s token."""
    if fence is not None and index.fences.get(branch, 0) != fence:
        raise FencedOut(
            f"{where}: this job's writer lease on branch {branch!r} was taken over (fencing "
            f"token {fence}, now {index.fences.get(branch, 0)}: another job took the lease, "
            f"or `repair` rebuilt the index); {refused}. Stop this job, or restart it to "
            "take the lease again."
        )
