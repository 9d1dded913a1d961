"""A manager's saves with a local tier: each save lands on this host first (one process
per host writes it), a bucket save is uploaded from there, and a restore takes the newest
version it can prove complete, local or remote, falling back tier by tier.

Where a save goes and where a restore looks::

    step() ──every_steps──▶ local tier (host disk, /dev/shm) ──▶ partner host (replica)
       └──save policies───▶ local tier ──upload (blobs it lacks)──▶ bucket

    restore(): local versions saved on top of the bucket's head, or the one the head was
    uploaded from (most recent first); then the bucket's lineage -- each bucket version
    read from this host's local copy of it when there is one -- each checked by hash; a
    version that fails is passed over. Ranks spanning hosts first agree on a step every
    host can get from its own tier or a peer's (cloudckpt.tiers.replicas).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from cloudckpt.background import SaveJob
from cloudckpt.branch_writer import BranchWriter
from cloudckpt.errors import CloudCkptError, CorruptCheckpoint, RanksUnreachable, StoreError
from cloudckpt.tiers import replicas
from cloudckpt.tiers.copy import copy_version
from cloudckpt.tiers.local import (
    TIER_KEY,
    BucketHead,
    HostTier,
    LocalTier,
    LocalVersions,
    TierRecord,
)
from cloudckpt.tiers.replicas import HostMap, RecoverReport, ReplicaReport
from cloudckpt.versions import Index, Version

log = logging.getLogger("cloudckpt.tiers")


class TieredSaves:
    """The local tier of one run, next to its bucket branch (``writer``)."""

    def __init__(self, tier: LocalTier, writer: BranchWriter) -> None:
        self.tier, self.writer = tier, writer
        self.host = HostTier(tier, writer.repo.uri, writer.branch)
        #: The bucket head local saves are made on top of.
        self.bucket_head: str | None = None
        self._hosts: HostMap | None = None
        #: What the last replication of a local save moved (ranks spanning hosts).
        self.last_replica: ReplicaReport | None = None
        #: What the last restore's recovery from peers did (ranks spanning hosts).
        self.last_recover: RecoverReport | None = None
        #: The run's generation (see :class:`~cloudckpt.tiers.local.TierRecord`).
        self.generation = 0
        #: The writer lease's fencing token since restore (None without a lease).
        self.fence: int | None = None

    def prepare(self) -> None:
        """Learn which ranks share a host (collective, on the training thread: an async
        save's thread must not run collectives of the step's group)."""
        if self._hosts is None:
            group = self.writer.group
            if not group.distributed:
                self._hosts = HostMap((self.tier.host,), (self.tier.host,))
                return
            self._hosts = HostMap.gather(group, self.tier.host)
            self._check_hosts_share_their_tier()

    def _check_hosts_share_their_tier(self) -> None:
        """Ranks that say they are on one host must see one tier directory: two machines
        under one host id (containers may share a hostname) would each think the other
        writes their tier. Every leader leaves a token there for its host's ranks."""
        group, hosts = self.writer.group, self._hosts
        assert hosts is not None
        token = None
        if hosts.is_leader(group.rank):
            token = secrets.token_hex(8)
            try:
                os.makedirs(self.host.root, exist_ok=True)
                with open(os.path.join(self.host.root, ".host-token"), "w") as f:
                    f.write(token)
            except OSError as e:  # a failing disk: the saves will say so
                log.error("cannot write to the local tier %s: %s", self.host, e)
                token = None
        tokens = group.all_gather_json(token)
        expected = tokens[hosts.leader(hosts.host_of(group.rank))]
        seen = expected
        if expected is not None and token is None:
            try:
                with open(os.path.join(self.host.root, ".host-token")) as f:
                    seen = f.read()
            except OSError:
                seen = None
        strays = [r for r, ok in enumerate(group.all_gather_json(seen == expected)) if not ok]
        if strays:
            raise ValueError(
                f"ranks {strays} share a host id with a lower rank but not its local tier "
                f"{self.tier.path!r}: they run on another machine under the same host id "
                "(containers may share a hostname). Give each machine its own id: "
                "LocalTier(host=...)"
            )

    @property
    def hosts(self) -> HostMap:
        self.prepare()
        assert self._hosts is not None
        return self._hosts

    @property
    def leader(self) -> bool:
        """Whether this rank writes its host's local tier (the host's lowest rank)."""
        return self.hosts.is_leader(self.writer.group.rank)

    @property
    def spans_hosts(self) -> bool:
        return len(self.hosts.hosts) > 1

    def commit(self, state: Any, job: SaveJob) -> Version | None:
        """Save ``state`` to the local tier (and to the partner host's replica) and, if
        ``job.to_bucket``, upload it from there: the bucket version on every rank; else
        the local version (None on ranks that do not write their host's tier). A bucket
        save whose local save failed is uploaded from memory. A rank that stops answering
        fails the save (RanksUnreachable) after the local save landed: a restart finds it."""
        local = None
        lease = self.writer.lease
        if lease is not None and lease.lost:  # frozen past it: the bucket save is fenced too
            log.error("step %d is not saved locally: %s", job.step, lease.lost)
        elif self.leader:
            record = TierRecord(self.tier.host, self.bucket_head, self.fence, self.generation)
            try:
                local = self.host.commit(state, job.step, job.metrics, job.meta, record)
            except (CloudCkptError, OSError) as e:  # the host's disk: the bucket does not wait
                log.error(
                    "saving step %d to the local tier %s failed (delete it if it is damaged): %s",
                    job.step,
                    self.host,
                    e,
                )
        if self.spans_hosts and self.tier.replicas:
            try:  # collective; a failure is every rank's
                commit_group = self.writer.commit_group
                self.last_replica = replicas.replicate(commit_group, self.hosts, self.host, local)
            except RanksUnreachable as e:  # no rank can agree on anything more: the job ends
                kept = f" (it is saved in the local tier {self.host})" if local else ""
                log.error("step %d was not replicated%s: %s", job.step, kept, e)
                raise
            except CloudCkptError as e:  # the partner keeps its older replica
                log.error("replicating step %d to the partner host failed: %s", job.step, e)
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
        """On rank 0 (which writes its host's tier): the local version uploaded to the
        bucket; ``state`` committed from memory if there is none (the local save failed)
        or its copy does not verify."""
        repo, branch = self.writer.repo, self.writer.branch
        if local is not None:
            try:
                try:
                    doc = self.host.manifest(local)
                except StoreError as e:  # the host's disk fails
                    raise CorruptCheckpoint(str(e)) from e
                return copy_version(
                    self.host.source(),
                    doc,
                    repo,
                    branch,
                    fence=fence,
                    meta={TIER_KEY: {"host": self.tier.host, "local": local.id}},
                    before_publish=check_lease,
                    origin=f"the local tier ({self.host.root})",
                )
            except CorruptCheckpoint as e:  # damaged, or the host's disk fails
                log.error("the local copy of step %d does not verify (%s)", job.step, e)
        log.warning("uploading step %d from memory", job.step)
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
        self.prepare()
        self.bucket_head = head_id
        self.fence = index.fences.get(self.writer.branch) if self.writer.lease else None
        head = self.writer.repo.resolve(head_id, index) if head_id is not None else None
        current = BucketHead.of(self.writer.repo, head)
        held = self.host.held()  # the restore's one read of the tier's index
        # Saves from here on come after every save this host (any host) holds.
        newest = float(held.next_generation)
        group = self.writer.group
        self.generation = int(group.agree([newest])[0] if group.distributed else newest)
        skipped: dict[str, str] = {}
        alone = not self.writer.group.distributed
        if not alone:
            loaded = self._restore_ranks(current, held, into, apply, skipped)
            if loaded is not None:
                return loaded, head, skipped
        for local in held.candidates(current) if alone else []:
            try:
                apply(local, self.host.repo.load(local, into=into))
                log.info("resumed from the local tier: step %s (%s)", local.step, local.id)
                return local, head, skipped
            except (CorruptCheckpoint, StoreError) as e:  # a bad copy or a failing disk
                log.error("local version %s does not verify (%s); next", local.id, e)
                skipped[f"local:{local.id}"] = str(e)
        if head_id is None:
            return None, None, skipped
        # Several ranks load the bucket's copy alike (a collective), never a host's own.
        copies = held if alone else LocalVersions(self.host.repo)

        def load(candidate: Version) -> Any:
            """A bucket version's state, from this host's local copy if it has one."""
            local = copies.get(_local_copy(candidate, self.tier.host))
            if local is not None:
                try:
                    return self.host.repo.load(local, into=into)
                except (CorruptCheckpoint, StoreError) as e:
                    log.error("the local copy of %s does not verify (%s)", candidate.id, e)
            return self.writer.load(candidate.id, into)

        version, _, more = self.writer.restore(head_id, index, into, apply, load)
        return version, version, {**skipped, **more}

    def _restore_ranks(
        self,
        head: BucketHead,
        held: LocalVersions,
        into: dict[str, Any],
        apply: Callable[[Version, Any], None],
        skipped: dict[str, str],
    ) -> Version | None:
        """Several ranks: the newest save every host can get from its own tier (``held``,
        as read at the start) or a peer (received from the peer first), loaded on every
        rank from its host's tier; if any rank fails to load it, the next newest; None
        (the bucket next) when none is left."""
        group = self.writer.group
        failed: list[list[int]] = []
        for _ in range(self.tier.keep + 1):  # each round passes over one save at least
            own = None if failed else held  # a round after the first may have received some
            # The partners' replicas are re-created once the state is loaded: the job
            # waits for its own state only.
            self.last_recover = report = replicas.recover(
                group,
                self.hosts,
                self.host,
                head,
                replicated=True,
                exclude=failed,
                own=own,
                recreate_now=False,
            )
            target = report.target
            if target is None or report.order is None:
                return None

            def load(target: Version = target) -> None:
                apply(target, self.host.repo.load(target, into=into))

            try:
                group.on_each_rank(load, context="loading from the local tier: ")
            except RanksUnreachable:
                raise
            except CloudCkptError as e:
                log.error("the local tiers' step %s did not load on every rank: %s", target.step, e)
                skipped[f"local:{target.id}"] = str(e)
                failed.append(report.order)
                continue
            log.info("resumed from the local tiers: step %s (%s)", target.step, target.id)
            replicas.recreate(group, self.hosts, self.host, report)
            return target
        return None


def _local_copy(version: Version, host: str) -> str | None:
    """The local version a bucket version was uploaded from, if it was on ``host``."""
    record = version.meta.get(TIER_KEY)
    if isinstance(record, dict) and record.get("host") == host:
        local = record.get("local")
        return local if isinstance(local, str) else None
    return None
