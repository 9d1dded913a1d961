"""A manager's saves with a local tier: each save lands on this host first (one process
per host writes it), a bucket save is uploaded from there, and a restore takes the newest
version it can prove complete, local or remote, falling back tier by tier.

Where a save goes and where a restore looks::

    step() ──every_steps──▶ local tier (host disk, /dev/shm) ──▶ partner host (replica)
       └──save policies───▶ local tier ──upload (blobs it lacks)──▶ bucket

    restore(): local versions saved on top of the bucket's head (newest first), then the
    bucket's lineage -- each bucket version read from this host's local copy of it when
    there is one -- each checked by hash; a version that fails is passed over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cloudckpt import fallback, versions
from cloudckpt.background import SaveJob
from cloudckpt.branch_writer import BranchWriter
from cloudckpt.errors import CorruptCheckpoint, StoreError
from cloudckpt.tiers.copy import copy_version
from cloudckpt.tiers.local import TIER_KEY, HostTier, LocalTier
from cloudckpt.versions import Index, Version

log = logging.getLogger("cloudckpt.tiers")


class TieredSaves:
    """The local tier of one run, next to its bucket branch (``writer``)."""

    def __init__(self, tier: LocalTier, writer: BranchWriter) -> None:
        self.tier, self.writer = tier, writer
        self.host = HostTier(tier, writer.repo.uri, writer.branch)
        #: The bucket head local saves are made on top of.
        self.bucket_head: str | None = None
        self._leader: bool | None = None

    @property
    def leader(self) -> bool:
        """Whether this rank writes its host's local tier (the host's lowest rank)."""
        if self._leader is None:
            group = self.writer.group
            hosts = group.all_gather_json(self.tier.host) if group.distributed else [None]
            self._leader = hosts.index(hosts[group.rank]) == group.rank
        return self._leader

    def commit(self, state: Any, job: SaveJob) -> Version | None:
        """Save ``state`` to the local tier and, if ``job.to_bucket``, upload it from
        there: the bucket version on every rank; else the local version (None on ranks
        that do not write their host's tier)."""
        local = None
        if self.leader:
            try:
                local = self.host.commit(state, job.step, job.metrics, job.meta, self.bucket_head)
            except StoreError as e:  # the host's disk failed: the bucket does not wait on it
                log.error("saving step %d to the local tier %s failed: %s", job.step, self.host, e)
        if not job.to_bucket:
            return local
        version = self.writer.publish_from_rank0(
            lambda fence, check: self._upload(local, state, job, fence, check)
        )
        self.bucket_head = version.id
        return version

    def _upload(
        self,
        local: Version | None,
        state: Any,
        job: SaveJob,
        fence: int | None,
        check_lease: Callable[[], None],
    ) -> Version:
        """On rank 0: the local version uploaded to the bucket, or, if there is none (the
        local save failed) or it cannot be read back whole, ``state`` committed directly."""
        repo, branch = self.writer.repo, self.writer.branch
        if local is not None:
            record = {"host": self.tier.host, "local": local.id}
            try:
                doc = self.host.manifest(local)
                return copy_version(
                    self.host.source(),
                    doc,
                    repo,
                    branch,
                    fence=fence,
                    meta={TIER_KEY: record},
                    before_publish=check_lease,
                )
            except CorruptCheckpoint as e:
                log.error(
                    "the local copy of step %d does not verify (%s); uploading it from memory",
                    job.step,
                    e,
                )
        check_lease()
        meta = {**job.meta, TIER_KEY: {"host": self.tier.host}}
        return repo.commit(
            state, branch=branch, step=job.step, metrics=job.metrics, meta=meta, fence=fence
        )

    # -- restore ---------------------------------------------------------------------
    def restore(
        self,
        head_id: str | None,
        index: Index,
        into: dict[str, Any],
        apply: Callable[[Version, Any], None],
    ) -> tuple[Version | None, Version | None, dict[str, str]]:
        """Load into ``into`` the newest version that verifies, local or remote, and
        ``apply`` it (it raises CorruptCheckpoint if it does not fit). Returns the
        version loaded (None: nothing to load), the bucket version it is or was based on,
        and version id -> why, for each newer one passed over."""
        self.bucket_head = head_id
        head = self.writer.repo.resolve(head_id, index) if head_id is not None else None
        skipped: dict[str, str] = {}
        alone = not self.writer.group.distributed
        for local in self.host.candidates(head_id) if alone else []:
            try:
                apply(local, self.host.repo.load(local.id, into=into))
                log.info("resumed from the local tier: step %s (%s)", local.step, local.id)
                return local, head, skipped
            except (CorruptCheckpoint, StoreError) as e:  # a bad copy or a failing disk
                log.error("local version %s does not verify (%s); next", local.id, e)
                skipped[f"local:{local.id}"] = str(e)
        if head_id is None:
            return None, None, skipped
        held = {v.id for v in self.host.versions()} if alone else set()

        def attempt(candidate: Version) -> None:
            local_id = _local_copy(candidate, self.tier.host)
            if local_id in held:
                try:
                    apply(candidate, self.host.repo.load(local_id, into=into))
                    return
                except (CorruptCheckpoint, StoreError) as e:
                    log.error("the local copy of %s does not verify (%s)", candidate.id, e)
            apply(candidate, self.writer.load(candidate.id, into))

        where = f"{self.writer.repo.uri} branch {self.writer.branch!r}"
        version, _, more = fallback.first_good(versions.lineage(index, head_id), attempt, where)
        return version, version, {**skipped, **more}


def _local_copy(version: Version, host: str) -> str | None:
    """The local version a bucket version was uploaded from, if it was on ``host``."""
    record = version.meta.get(TIER_KEY)
    if isinstance(record, dict) and record.get("host") == host:
        local = record.get("local")
        return local if isinstance(local, str) else None
    return None
