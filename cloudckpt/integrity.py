"""Checking a version end to end, and restoring published versions ``versions.json`` lost."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
from dataclasses import dataclass, field

from cloudckpt import manifest, schema, versions
from cloudckpt.blobs import BlobReader, TransferOptions
from cloudckpt.commit import present_blobs
from cloudckpt.errors import (
    CommitConflict,
    CorruptCheckpoint,
    PreconditionFailed,
    UnsupportedFormat,
)
from cloudckpt.lease import lease_fence
from cloudckpt.store import Store
from cloudckpt.turns import wait_for_sweeps
from cloudckpt.versions import MAX_SWEEP_TTL, Index, Sweep, Version

log = logging.getLogger("cloudckpt")


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`: every blob downloaded, decompressed and hashed."""

    version: str
    blobs: int = 0
    bytes: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # object -> what is wrong

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store, transfer: TransferOptions, version: Version) -> VerifyReport:
    """Check that a version loads: its manifest parses and is consistent, and each blob
    exists, has the stored size, decompresses and matches its hash. Reports every bad
    object instead of stopping at the first."""
    report = VerifyReport(version.id)
    try:
        doc = manifest.read(store, version.id, expected=version)  # every entry checked
    except CorruptCheckpoint as e:
        report.problems[manifest.key(version.id)] = str(e)
        return report
    stats, problems = BlobReader(store, transfer).verify(doc.tensors)
    report.blobs, report.bytes = stats.transferred_blobs, stats.logical_bytes
    report.problems.update(problems)
    return report


def repair(store: Store, attempts: int = 16) -> Index:
    """Bring back into ``versions.json`` the published versions it lost.

    A version is brought back when its manifest parses, its ``published/`` marker says
    its commit was acknowledged (manifests of format 1 predate markers and count as
    published), all its blobs are stored, and it is neither in the index nor deleted.
    With a readable index nothing in it is dropped or changed, and a branch head only
    moves to a descendant of itself. With an unreadable one the index is rebuilt: each
    branch's head is its newest version (the longest lineage), tags are lost, every
    branch's fencing token is raised past any seen (current writers must take their lease
    again), and commits wait up to five minutes for any collection that was sweeping when
    the index was lost to stop.

    Like a commit, the swap waits for running garbage collections and is refused if one
    started meanwhile, so a version being swept is never brought back.
    """
    for _ in range(attempts):
        try:
            epoch: int | None = wait_for_sweeps(store)
        except UnsupportedFormat:
            raise
        except CorruptCheckpoint:  # no collection can start on it either
            epoch = None
        found_rows = _published(store)
        found = store.read_versioned(versions.KEY)
        try:
            current = versions.Index.parse(found[0], store.url(versions.KEY)) if found else Index()
        except UnsupportedFormat:
            raise  # a newer release's index is not damage: never rebuild over it
        except CorruptCheckpoint:
            current = None
        if current is not None and (current.sweeps or current.gc_epoch != epoch):
            continue
        if current is None:
            log.warning(
                "repair: %s does not parse; rebuilding it (tags are lost; commits wait up to "
                "%.0fs for any garbage collection that was sweeping to stop)",
                versions.KEY,
                MAX_SWEEP_TTL,
            )
            new = _rebuilt(store, found_rows)
        else:
            new = _merged(store, current, found_rows)
            if new is None:
                log.info("repair: %s lacks no published version", store.url(versions.KEY))
                return current
        try:
            store.put_if_match(versions.KEY, new.dumps(), found[1] if found else None)
        except PreconditionFailed:
            continue
        log.info(
            "repaired %s: %d versions, %d branches", store.uri, len(new.versions), len(new.branches)
        )
        return new
    raise CommitConflict(f"{store.url(versions.KEY)} kept changing while repair ran; retry")


def _published(store: Store) -> dict[str, Version]:
    """The rows of every manifest whose commit was acknowledged."""
    markers = {
        manifest.vid_of(k) for k in store.list_keys(manifest.MARKERS) if manifest.is_marker_key(k)
    }
    rows: dict[str, Version] = {}
    for key in filter(manifest.is_key, store.list_keys(manifest.PREFIX)):
        vid = manifest.vid_of(key)
        try:
            doc = manifest.read(store, vid)
        except CorruptCheckpoint as e:
            if store.stat(key) is None:  # removed since the listing: a collection swept it
                log.debug("repair: %s is gone since it was listed", key)
            else:
                log.warning("repair: skipping %s: %s", key, e)
            continue
        if vid in markers or doc.format == 1:
            rows[vid] = dataclasses.replace(doc.version, manifest_hash=doc.content_hash)
    return rows


def _complete(store: Store, rows: list[Version]) -> list[Version]:
    """The rows whose blobs are all stored."""
    needed = {r.id: manifest.read(store, r.id).digests() for r in rows}
    present = present_blobs(store, set().union(*needed.values())) if needed else set()
    for r in rows:
        if not needed[r.id] <= present:
            log.warning(
                "repair: not restoring %s: %d of its blobs are gone",
                r.id,
                len(needed[r.id] - present),
            )
    return [r for r in rows if needed[r.id] <= present]


def _newest_leaf(index: Index, branch: str) -> str:
    """The head to give ``branch`` when the index is rebuilt: a version of it no other
    version of it descends from, the one with the longest lineage (clocks of different
    writers may disagree; parent links do not), then the newest."""
    rows = [r for r in index.versions.values() if r.branch == branch]
    parents = {r.parent for r in rows}
    leaves = [r for r in rows if r.id not in parents] or rows

    def depth(row: Version) -> int:
        return sum(1 for _ in versions.lineage(index, row.id))

    return max(leaves, key=lambda r: (depth(r), r.created, r.id)).id


def _merged(store: Store, current: Index, rows: dict[str, Version]) -> Index | None:
    lost = [
        r for vid, r in rows.items() if vid not in current.versions and vid not in current.deleted
    ]
    lost = _complete(store, lost)
    if not lost:
        return None
    new = dataclasses.replace(current, versions=dict(current.versions))
    for row in lost:
        new.versions[row.id] = row
    new.versions = dict(sorted(new.versions.items(), key=lambda kv: (kv[1].created, kv[0])))
    new.branches = dict(current.branches)
    for row in sorted(lost, key=lambda v: (v.created, v.id)):
        head = new.branches.get(row.branch)
        if head is None or versions.descends(new, row.id, head):
            new.branches[row.branch] = row.id
    log.info(
        "repair: restoring %d published versions: %s", len(lost), ", ".join(r.id for r in lost)
    )
    return new


def _rebuilt(store: Store, rows: dict[str, Version]) -> Index:
    # A collection may have been sweeping when the index was lost: its entry is gone with
    # it, so a stand-in makes commits wait (and then check their blobs) until any such
    # collection has stopped deleting: unrenewed, it stops within its ttl.
    new = Index(
        gc_epoch=secrets.randbits(48),
        sweeps={f"lost-by-repair-{secrets.token_hex(4)}": Sweep(0, MAX_SWEEP_TTL)},
    )
    for row in sorted(_complete(store, list(rows.values())), key=lambda v: (v.created, v.id)):
        new.versions[row.id] = row
    for branch in {r.branch for r in new.versions.values()}:
        new.branches[branch] = _newest_leaf(new, branch)
    leased = set()  # branch names
    for key in store.list_keys("leases/"):
        with contextlib.suppress(schema.Invalid):
            leased.add(schema.name(key.removeprefix("leases/").removesuffix(".json")))
    for branch in set(new.branches) | leased:  # a leased branch may have no version yet
        seen = [r.fence or 0 for r in new.versions.values() if r.branch == branch]
        seen.append(lease_fence(store, branch))
        new.fences[branch] = min(max(seen) + 1, schema.MAX_INT)
    return new
