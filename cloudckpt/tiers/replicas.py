"""Peer replicas of the local tier: each host's recent saves kept on a partner host too.

In a job spanning hosts, every host's leader (its lowest rank) sends each local save to
its partner -- the next host in a ring of the hosts in rank order -- over the
checkpoint's gloo group (:mod:`cloudckpt.tiers.peer`); the partner keeps the newest
``keep`` of them in a replica repository of that host (:meth:`HostTier.replica`). Blobs
are content-addressed: the partner names the blobs it lacks first, so a blob it already
stores is never sent again.

At restore, a replaced host (its local directory empty) gets the newest step every host
can still reach from its partner instead of the bucket, and re-creates its partner's
replica. A step any host cannot reach, a version based on another bucket head, or a
damaged transfer (every blob is checked against its hash) means no local restore: every
rank returns None and the caller restores from the bucket.

Every step is collective and fails on every rank when it fails on one; nothing is pickled.
A rank killed, frozen or cut off mid-transfer fails it on every other rank with
RanksUnreachable, each within the group's timeout (``DistributedOptions(timeout=...)``);
a replica is published by the commit protocol, so a transfer cut short publishes nothing
and leaves the receiver's older replicas as they were.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cloudckpt.distributed.collectives import Group
from cloudckpt.errors import CloudCkptError, RanksUnreachable
from cloudckpt.repo import Repo
from cloudckpt.tiers import peer
from cloudckpt.tiers.links import siblings
from cloudckpt.tiers.local import BucketHead, HostTier, LocalVersions, order, prune_run
from cloudckpt.tiers.plan import plan
from cloudckpt.versions import Version

log = logging.getLogger("cloudckpt.tiers")


@dataclass(frozen=True)
class HostMap:
    """The job's hosts, in order of their lowest rank, and each rank's host."""

    hosts: tuple[str, ...]
    rank_hosts: tuple[str, ...]

    @classmethod
    def gather(cls, group: Group, host: str) -> HostMap:
        """Every rank's host id (collective)."""
        ids = group.all_gather_json(host)
        return cls(tuple(dict.fromkeys(ids)), tuple(ids))

    def ranks(self, host: str) -> list[int]:
        return [r for r, h in enumerate(self.rank_hosts) if h == host]

    def host_of(self, rank: int) -> str:
        return self.rank_hosts[rank]

    def leader(self, host: str) -> int:
        """The rank that writes ``host``'s tier: its lowest."""
        return self.rank_hosts.index(host)

    def is_leader(self, rank: int) -> bool:
        return self.leader(self.rank_hosts[rank]) == rank

    def partner(self, host: str) -> str | None:
        """The host ``host`` sends its replica to (None with one host)."""
        if len(self.hosts) < 2:
            return None
        return self.hosts[(self.hosts.index(host) + 1) % len(self.hosts)]

    def replicated_by(self, host: str) -> str | None:
        """The host whose replica ``host`` keeps (the inverse of :meth:`partner`)."""
        if len(self.hosts) < 2:
            return None
        return self.hosts[(self.hosts.index(host) - 1) % len(self.hosts)]


@dataclass
class ReplicaReport:
    """What one :func:`replicate` moved from this rank (blob bytes; manifests apart)."""

    bytes_sent: int = 0
    blobs_sent: int = 0
    bytes_received: int = 0
    #: Blobs of the received version this host held already (hard-linked, not sent).
    blobs_linked: int = 0
    seconds: float = 0.0
    #: The replica version this host stored of its peer's save (leaders only).
    stored: Version | None = None


@dataclass
class RecoverReport:
    """The outcome of :func:`recover` on this rank."""

    #: The version to load, in this host's own tier; None: restore from the bucket.
    target: Version | None = None
    step: int | None = None
    #: The target's place among the run's saves, ``[generation, step]``.
    order: list[int] | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    #: Why there is no target, or what failed after it was in place.
    reason: str = ""
    transfers: list[dict[str, Any]] = field(default_factory=list)
    #: The rounds that re-create partners' replicas, where :func:`recover` was told to
    #: leave them to :func:`recreate` (after the load).
    pending: list[list[dict[str, Any]]] = field(default_factory=list)
    #: This host's target id in its own tier (what the pending rounds send).
    own_id: str | None = None


# -- moving one version between leaders ---------------------------------------------------
@dataclass(frozen=True)
class _Out:
    """This leader sends rank ``peer`` the version ``find()`` names (in its repository;
    None: nothing to send). Found by the sending thread, so that a failure to find it is
    sent to the peer too."""

    peer: int
    find: Callable[[], tuple[Repo, Version] | None]


@dataclass(frozen=True)
class _In:
    """This leader stores the version rank ``peer`` sends on ``branch`` of ``repo``."""

    peer: int
    repo: Repo
    branch: str
    keep: int | None = None  # prune the repository to this many versions after
    local: peer.Local | None = None  # places blobs this host holds in another repository


def _exchange(
    group: Group, out: _Out | None, inn: _In | None, context: str
) -> tuple[Version | None, peer.Moved, peer.Moved]:
    """Run this rank's side of a round of conversations (none on a rank with nothing to
    send or receive), then agree: if any rank failed, every rank raises RanksFailed.
    Returns the version received here and what was sent and received. A peer that
    stopped answering raises RanksUnreachable here at once: it would not agree either
    (every other rank fails on its own, within the group's timeout)."""
    sent, received = peer.Moved(), peer.Moved()
    stored: Version | None = None
    errors: list[BaseException] = []

    def sending() -> None:
        assert out is not None
        try:
            link = peer.Link(group, out.peer, peer.FORWARD, peer.REPLY)
            moved = peer.send(link, out.find)
            sent.bytes, sent.blobs = moved.bytes, moved.blobs
        except BaseException as e:  # shared below
            errors.append(e)

    thread = threading.Thread(target=sending, name="cloudckpt-replica-send", daemon=True)
    if out is not None:
        thread.start()
    try:
        if inn is not None:
            link = peer.Link(group, inn.peer, peer.REPLY, peer.FORWARD)
            stored, received = peer.receive(link, inn.repo, inn.branch, inn.local)
            if stored is not None and inn.keep is not None:
                prune_run(inn.repo, inn.branch, inn.keep)
    except BaseException as e:
        errors.append(e)
    finally:
        if out is not None:
            thread.join()  # each of its sends and receives is bounded by the group's timeout

    lost = [e for e in errors if isinstance(e, RanksUnreachable)]
    if lost:
        raise lost[0]

    def outcome() -> None:
        if errors:
            raise errors[0]

    group.all_reduce(outcome, lambda _: None, context=context)
    return stored, sent, received


# -- replicate -----------------------------------------------------------------------------
def replicate(
    group: Group, hosts: HostMap, tier: HostTier, version: Version | None
) -> ReplicaReport:
    """Send this host's new local save ``version`` to its partner, and keep the one this
    host's peer sends (collective over every rank; non-leaders pass None, as may a leader
    with nothing to send). If any rank fails, every rank raises RanksFailed; a replica
    half received is never published."""
    t0 = time.perf_counter()
    report = ReplicaReport()
    host = hosts.host_of(group.rank)
    partner, source = hosts.partner(host), hosts.replicated_by(host)
    if partner is None or source is None:
        return report
    out = inn = None
    if hosts.is_leader(group.rank):
        out = _Out(hosts.leader(partner), lambda: None if version is None else (tier.repo, version))
        dst = tier.replica(source)
        inn = _In(hosts.leader(source), dst, tier.branch, tier.tier.keep, siblings(tier, dst))
    stored, sent, received = _exchange(group, out, inn, "replicating the local tier: ")
    report.bytes_sent, report.blobs_sent = sent.bytes, sent.blobs
    report.bytes_received, report.stored = received.bytes, stored
    report.blobs_linked = received.linked
    report.seconds = time.perf_counter() - t0
    return report


# -- recover -------------------------------------------------------------------------------
def _listing(held: LocalVersions, head: BucketHead, exclude: list[list[int]]) -> list[list[Any]]:
    """``[[generation, step], id]`` of each version a restore may take, unless excluded."""
    return [
        [key, v.id]
        for v in held.versions
        if (key := list(order(v)[:2])) not in exclude and held.current(v, head)
    ]


def _holdings(
    me: str,
    hosts: HostMap,
    tier: HostTier,
    head: BucketHead,
    exclude: list[list[int]],
    own: LocalVersions | None,
) -> dict[str, Any]:
    """What host ``me``'s leader can restore from: its own versions (``own``; None: read
    them) and the replicas it keeps (those a restore may take with the bucket at ``head``,
    by their place among the run's saves: (generation, step), the same on every host)."""
    replicas = {
        h: _listing(LocalVersions.read(tier.replica(h), tier.branch), head, exclude)
        for h in hosts.hosts
        if h != me
    }
    mine = _listing(own if own is not None else tier.held(), head, exclude)
    return {"host": me, "head": head.id, "own": mine, "replicas": replicas}


def _round(
    group: Group, hosts: HostMap, tier: HostTier, transfers: list[dict[str, Any]], mine: str | None
) -> tuple[Version | None, peer.Moved, peer.Moved]:
    """One round of the plan; ``mine``: this host's target id in its own tier."""
    host = hosts.host_of(group.rank)
    out = inn = None
    if hosts.is_leader(group.rank):
        for t in transfers:
            if t["src"] == host:
                out = _Out(hosts.leader(t["dst"]), _finder(tier, host, t["of"], t["id"] or mine))
            if t["dst"] == host:
                own = t["into"] == "own"
                repo = tier.repo if own else tier.replica(t["of"])
                keep = None if own else tier.tier.keep
                inn = _In(hosts.leader(t["src"]), repo, tier.branch, keep, siblings(tier, repo))
    return _exchange(group, out, inn, "recovering the local tier from peers: ")


def _finder(
    tier: HostTier, host: str, of: str, vid: str | None
) -> Callable[[], tuple[Repo, Version] | None]:
    """Finds version ``vid`` in this host's own tier, or in its replica of host ``of``."""

    def find() -> tuple[Repo, Version] | None:
        repo = tier.repo if of == host else tier.replica(of)
        return None if vid is None else (repo, repo.resolve(vid))

    return find


def recover(
    group: Group,
    hosts: HostMap,
    tier: HostTier,
    bucket_head: BucketHead,
    replicated: bool = False,
    exclude: list[list[int]] | None = None,
    own: LocalVersions | None = None,
    recreate_now: bool = True,
) -> RecoverReport:
    """Put the newest step every host can reach in every host's own tier, receiving it
    from peers where a host lacks it, then re-create the replicas partners lack
    (collective, every rank, before anything is loaded -- or, with ``recreate_now``
    False, left in the report for :func:`recreate` once the target is loaded). The
    target is None on every rank when there is no such step or a transfer failed:
    restore from the bucket. (A
    rank that stopped answering raises RanksUnreachable: the ranks can no longer agree
    on anything, not even on the bucket.)
    ``replicated``: every host saved the same state, so any host's copy will do (see
    :func:`cloudckpt.tiers.plan.plan`). ``exclude``: saves (``[generation, step]``, as
    :attr:`RecoverReport.order`) not to take -- they failed to load before. ``own``: this
    host's own tier as the caller read it (None: read here); the target is taken from it
    unless peers sent it."""
    t0 = time.perf_counter()
    report = RecoverReport()
    leader = hosts.is_leader(group.rank)
    host = hosts.host_of(group.rank)
    try:
        decided = group.all_reduce(
            lambda: (
                _holdings(host, hosts, tier, bucket_head, exclude or [], own) if leader else None
            ),
            lambda reports: plan(hosts, reports, replicated),
            context="planning the local restore: ",
        )
    except RanksUnreachable:
        raise
    except CloudCkptError as e:
        return _none(report, f"planning failed: {e}", t0)
    if decided["target"] is None:
        return _none(report, decided["reason"], t0)
    mine: str | None = decided["own"].get(host)
    try:
        for transfers in decided["fetch"]:
            got, sent, received = _round(group, hosts, tier, transfers, mine)
            mine = got.id if got is not None else mine
            _count(report, sent, received, transfers)
    except RanksUnreachable:
        raise
    except CloudCkptError as e:
        return _none(report, f"receiving from peers failed: {e}", t0)
    report.pending, report.own_id = decided["recreate"], mine
    if recreate_now:
        recreate(group, hosts, tier, report)
    try:
        ids = group.all_gather_json(mine)
        vid = ids[hosts.leader(host)]
        found = own.get(vid) if own is not None else None
        report.target = group.on_each_rank(
            lambda: found or tier.repo.resolve(vid), context="recover: "
        )
    except RanksUnreachable:
        raise
    except CloudCkptError as e:
        return _none(report, f"the target is not in the tier: {e}", t0)
    target = decided["target"]
    report.order = list(target) if isinstance(target, (list, tuple)) else [0, target]
    report.step = report.order[-1]
    report.seconds = time.perf_counter() - t0
    return report


def recreate(group: Group, hosts: HostMap, tier: HostTier, report: RecoverReport) -> None:
    """Re-create the replicas partners lack, as :func:`recover` planned (collective,
    every rank). A failure is logged in ``report.reason``: the target is in place, and
    the next save replicates again."""
    try:
        for transfers in report.pending:
            _, sent, received = _round(group, hosts, tier, transfers, report.own_id)
            _count(report, sent, received, transfers)
    except RanksUnreachable:
        raise
    except CloudCkptError as e:
        report.reason = f"re-creating replicas failed: {e}"
        log.warning("recover: %s", report.reason)
    report.pending = []


def _count(
    report: RecoverReport, sent: peer.Moved, received: peer.Moved, transfers: list[Any]
) -> None:
    report.bytes_sent += sent.bytes
    report.bytes_received += received.bytes
    report.transfers += transfers


def _none(report: RecoverReport, reason: str, t0: float) -> RecoverReport:
    report.target, report.reason, report.pending = None, reason, []
    report.seconds = time.perf_counter() - t0
    log.info("no local restore: %s", reason)
    return report
