"""Checking a version end to end, and rebuilding ``versions.json`` from the manifests."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cloudckpt import loading, versions
from cloudckpt.blobs import BlobReader
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.versions import Index, Version

if TYPE_CHECKING:
    from cloudckpt.repo import Repo

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


def verify(repo: Repo, ref: str = "main") -> VerifyReport:
    """Check that a version loads: its manifest parses and is consistent, and each blob
    exists, has the stored size, decompresses and matches its hash. Reports every bad
    object instead of stopping at the first."""
    version = repo.resolve(ref)
    report = VerifyReport(version.id)
    try:
        doc = repo.manifest(version)
        for entry in doc["tensors"]:
            loading.check_entry(entry)
    except CorruptCheckpoint as e:
        report.problems[f"manifests/{version.id}.json"] = str(e)
        return report
    stats, problems = BlobReader(repo.store, repo.options.transfer).verify(doc["tensors"])
    report.blobs, report.bytes = stats.transferred_blobs, stats.logical_bytes
    report.problems.update(problems)
    return report


def repair(repo: Repo) -> Index:
    """Rebuild ``versions.json`` from the immutable manifests.

    Every manifest that parses becomes a version; each branch's head is its newest
    version. Tags survive if the old ``versions.json`` still parses; versions deleted but
    not yet garbage-collected come back (delete them again).
    """
    rebuilt = Index()
    for key in repo.store.list_keys("manifests"):
        try:
            doc = json.loads(repo.store.get(key))
            row = Version.from_dict(doc)
        except (ValueError, TypeError, CorruptCheckpoint) as e:
            log.warning("repair: skipping %s: %s", key, e)
            continue
        if row.id and key == f"manifests/{row.id}.json":
            rebuilt.versions[row.id] = row
    for row in sorted(rebuilt.versions.values(), key=lambda v: (v.created, v.id)):
        rebuilt.branches[row.branch] = row.id
    try:
        old = versions.read(repo.store)[0]
        rebuilt.tags = {t: v for t, v in old.tags.items() if v in rebuilt.versions}
    except CorruptCheckpoint:
        log.warning("repair: the old %s does not parse; tags are lost", versions.KEY)

    # Compare-and-swap against whatever is there, parseable or not.
    found = repo.store.read_versioned(versions.KEY)
    repo.store.put_if_match(versions.KEY, rebuilt.dumps(), found[1] if found else None)
    log.info("repaired %s: %d versions, %d branches", repo.uri, len(rebuilt.versions),
             len(rebuilt.branches))  # fmt: skip
    return rebuilt
