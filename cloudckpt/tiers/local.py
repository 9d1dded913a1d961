"""The local tier: a run's saves on this host's disk (NVMe or ``/dev/shm``), taken at
their own cadence, uploaded to the bucket at a slower one.

Each run (repository URI and branch) has a repository of its own under the tier's path,
written by one process per host; blobs are stored uncompressed, so a local save costs a
write of the state and a local restore a read. Nothing in it is visible to another host
or to readers of the bucket: a version leaves the host only when it is uploaded (or sent
to a peer, :mod:`cloudckpt.tiers.replicas`).

Every local version records the bucket head it was saved on top of (``meta["tier"]``):
a restore takes a local version only if the bucket's branch has not moved since, so a
host never resumes a run from its own stale lineage after another host went on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cloudckpt import codec
from cloudckpt.blobs import BlobReader, TransferOptions
from cloudckpt.errors import CheckpointNotFound, CloudCkptError, CorruptCheckpoint, StoreError
from cloudckpt.gc import collect
from cloudckpt.manifest import Manifest
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.tiers.copy import BlobSource
from cloudckpt.versions import Version

log = logging.getLogger("cloudckpt.tiers")

#: The key of a local version's tier record in its meta.
TIER_KEY = "tier"
#: The ttl of the local pruning's sweeps. A process killed while pruning leaves its sweep
#: registered, and the next local save (the restarted process's) waits that long for it
#: before publishing: the bucket's default (a minute) would stall the restart's first
#: step. Deleting a few local files takes milliseconds.
LOCAL_SWEEP_TTL = 3.0


@dataclass(frozen=True)
class LocalTier:
    """Where and how often a :class:`~cloudckpt.CheckpointManager` saves on this host.

    ``every_steps``: a local save every that many steps (the manager's own save
    policies say when a save also goes to the bucket; a bucket save is taken locally
    first and uploaded from there). ``keep``: local versions kept. ``host``: this host's
    id (several processes of one host share it; hosts differ). ``replicas``: in a job
    spanning hosts, send each local save to a partner host too. ``transfer``: how local
    blobs are written (uncompressed by default).
    """

    path: str
    every_steps: int = 1
    keep: int = 2
    host: str = field(default_factory=socket.gethostname)
    replicas: bool = True
    transfer: TransferOptions = field(default_factory=lambda: TransferOptions(compress=False))

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep < 1:
            raise ValueError("every_steps and keep must be at least 1")

    def due(self, step: int) -> bool:
        """Whether ``step`` is a local save."""
        return step % self.every_steps == 0


def run_dir(root: str, uri: str, branch: str) -> str:
    """The directory of one run's local repository under a tier's ``root``."""
    name = hashlib.sha256(f"{uri}\0{branch}".encode()).hexdigest()[:16]
    return os.path.join(os.path.abspath(os.path.expanduser(root)), name)


class HostTier:
    """One run's local repository on this host (and the peers' replicas it keeps)."""

    def __init__(self, tier: LocalTier, uri: str, branch: str) -> None:
        self.tier, self.branch = tier, branch
        self.root = run_dir(tier.path, uri, branch)
        self.repo = Repo(f"file://{self.root}", options=RepoOptions(transfer=tier.transfer))

    def __repr__(self) -> str:
        return f"HostTier({self.root!r}, branch={self.branch!r})"

    def commit(
        self,
        state: Any,
        step: int,
        metrics: dict[str, float],
        meta: dict[str, Any],
        record: TierRecord,
    ) -> Version:
        """Save ``state`` locally with its ``record``; drops local versions past
        ``keep``."""
        meta = {**meta, TIER_KEY: dataclasses.asdict(record)}
        version = self.repo.commit(
            state, branch=self.branch, step=step, metrics=metrics, meta=meta, fast_forward=True
        )
        prune_run(self.repo, self.branch, self.tier.keep, record.fence)
        return version

    def versions(self) -> list[Version]:
        """This run's local versions, the newest save first (see :func:`order`)."""
        return run_versions(self.repo, self.branch)

    def held(self) -> LocalVersions:
        """This run's local versions, from one read of the tier's index."""
        return LocalVersions.read(self.repo, self.branch)

    def replica(self, host: str) -> Repo:
        """The replicas of host ``host``'s saves this host keeps (``replicas/<host>``
        under the run's directory; stored like the tier's own versions)."""
        name = re.sub(r"[^A-Za-z0-9._-]", "_", host)[:64].lstrip(".") or "_"
        if name != host:  # distinct ids stay distinct directories
            name += "-" + hashlib.sha256(host.encode()).hexdigest()[:8]
        path = os.path.join(self.root, "replicas", name)
        return Repo(f"file://{path}", options=RepoOptions(transfer=self.tier.transfer))

    def manifest(self, version: Version) -> Manifest:
        return self.repo.manifest(version)

    def source(self) -> BlobSource:
        """Reads a local blob's raw bytes by hash, in place, for ``copy_version`` (which
        checks them: once is enough); CorruptCheckpoint if the host's disk fails (the
        caller takes the state from elsewhere)."""
        reader = BlobReader(self.repo.store, self.repo.options.transfer)

        def raw(digest: str, size: int) -> Any:
            try:
                return reader.raw(digest, size, check=False)
            except (StoreError, OSError) as e:
                raise CorruptCheckpoint(f"{self}: cannot read blob {digest}: {e}") from e

        return raw


@dataclass(frozen=True)
class TierRecord:
    """What a local save records of where it stands (``meta["tier"]``): the host, the
    bucket head it was saved on, the writer lease's fencing token then (None without
    a lease) and the run's generation -- raised at every restore and health rollback,
    so (generation, step) orders a run's saves as they were made, across rollbacks that
    repeat steps and clocks that step back."""

    host: str
    bucket_head: str | None
    fence: int | None = None
    generation: int = 0


def record_of(version: Version) -> dict[str, Any]:
    record = version.meta.get(TIER_KEY)
    if not isinstance(record, dict):
        raise CorruptCheckpoint(f"local version {version.id} has no tier record")
    return record


def order(version: Version) -> tuple[int, int, float]:
    """A local version's place among the run's saves: (generation, step, created)."""
    record = version.meta.get(TIER_KEY)
    generation = record.get("generation") if isinstance(record, dict) else None
    return (generation if type(generation) is int else 0, version.step or 0, version.created)


def run_versions(repo: Repo, branch: str) -> list[Version]:
    """``branch``'s versions in a tier or replica repository, the newest save first;
    none if it is empty -- or unreadable (a failing disk, a damaged index: logged, the
    next tier serves)."""
    try:
        index = repo.index()
    except CheckpointNotFound:
        return []
    except (CloudCkptError, OSError) as e:
        log.error("cannot read the local tier %s (delete it to start it afresh): %s", repo, e)
        return []
    mine = [v for v in index.versions.values() if v.branch == branch]
    return sorted(mine, key=order, reverse=True)


@dataclass(frozen=True)
class LocalVersions:
    """A run's versions in one local repository (its tier, or a replica it keeps), from
    one read of its index: the newest save first (see :func:`order`)."""

    repo: Repo
    versions: tuple[Version, ...] = ()

    @classmethod
    def read(cls, repo: Repo, branch: str) -> LocalVersions:
        return cls(repo, tuple(run_versions(repo, branch)))

    def get(self, vid: str | None) -> Version | None:
        return next((v for v in self.versions if v.id == vid), None)

    @cached_property
    def fence(self) -> int | None:
        """The highest lease token among these saves (see :func:`newest_fence`)."""
        return newest_fence(self.versions)

    @property
    def next_generation(self) -> int:
        """The generation of a save made after every one of these."""
        return max((order(v)[0] + 1 for v in self.versions), default=0)

    def current(self, version: Version, head: BucketHead) -> bool:
        """Whether a restore may take ``version`` (one of these) with the bucket at
        ``head`` (see :func:`current`)."""
        return current(self.repo, version, head, self.fence)

    def candidates(self, head: BucketHead) -> Iterator[Version]:
        """The versions a restore may take with the bucket at ``head``, the newest save
        first; each checked as it is reached (the check may read its manifest)."""
        return (v for v in self.versions if self.current(v, head))


def prune_run(repo: Repo, branch: str, keep: int, fence: int | None = None) -> None:
    """Keep ``branch``'s newest ``keep`` saves (its head always) and any saved under a
    later lease than ``fence`` (the pruner's: a job frozen past its lease never deletes
    its successor's saves); their data goes at once (nothing else writes these
    repositories). A failure is logged: the next one prunes."""
    try:
        index = repo.index()
        head = index.branches.get(branch)
        mine = sorted(
            (v for v in index.versions.values() if v.branch == branch),
            key=lambda v: (v.id == head, order(v)),
            reverse=True,
        )
        doomed = [v.id for v in mine[keep:] if fence is None or (newest_fence([v]) or 0) <= fence]
        if doomed:
            repo.delete(doomed, branch=branch)
            collect(repo.store, grace=0, sweep_ttl=LOCAL_SWEEP_TTL)
    except (CloudCkptError, OSError) as e:
        log.warning("pruning the local tier %s failed: %s", repo, e)


@dataclass(frozen=True)
class BucketHead:
    """The bucket branch's head, as local versions are compared with it: its id, its
    parent and step, and the digest of the state it holds (:attr:`content`)."""

    id: str | None
    parent: str | None = None
    step: int | None = None
    #: Reads :attr:`content` ("" if it cannot be read).
    digest: Callable[[], str] = field(default=lambda: "", repr=False, compare=False)

    @classmethod
    def of(cls, repo: Repo, version: Version | None) -> BucketHead:
        """The head ``version`` of a bucket ``repo`` (None: the branch has none)."""
        if version is None:
            return cls(None)

        def digest() -> str:
            try:
                return state_digest(repo.manifest(version))
            except CorruptCheckpoint:  # a restore passes it over; no local copy stands for it
                return ""

        return cls(version.id, version.parent, version.step, digest)

    @cached_property
    def content(self) -> str:
        """The :func:`state_digest` of the head, read when a local version is first
        compared with it by content (most restores never are)."""
        return self.digest()


def state_digest(doc: Manifest) -> str:
    """What a version holds, whatever repository and codec store it: its skeleton and
    each array's path, kind, dtype, shape and chunk hashes."""
    arrays = [
        [e["path"], e["kind"], e["dtype"], e["shape"], [c[0] for c in e["chunks"]]]
        for e in doc.tensors
    ]
    return codec.content_hash(json.dumps([doc.state, arrays], sort_keys=True).encode())


def newest_fence(versions: Iterable[Version]) -> int | None:
    """The highest lease token among the local saves of a repository (None: none
    recorded one)."""
    fences = []
    for v in versions:
        record = v.meta.get(TIER_KEY)
        fence = record.get("fence") if isinstance(record, dict) else None
        if type(fence) is int:
            fences.append(fence)
    return max(fences, default=None)


def current(repo: Repo, version: Version, head: BucketHead, fence: int | None = None) -> bool:
    """Whether a restore may take local ``version`` (of ``repo``) with the bucket at
    ``head``: it was saved on top of the head, or it is the local save the head was
    uploaded from (saved on the head's parent, at its step, holding the same state --
    each host's own copy of a bucket save counts) -- and no later lease holder saved
    here (``fence``: the highest lease token among the repository's saves): a job
    frozen past its lease that went on saving locally is passed over. A version without
    a tier record, or whose manifest does not read, never does."""
    try:
        mine = record_of(version).get("fence")
        if fence is not None and (type(mine) is not int or mine < fence):
            return False
        base = based_on(version)
        if base == head.id:
            return True
        if head.id is None or base != head.parent or version.step != head.step:
            return False
        if not head.content:
            return False
        return state_digest(repo.manifest(version)) == head.content
    except CorruptCheckpoint:
        return False


def based_on(version: Version) -> str | None:
    """The bucket head a local version was saved on top of."""
    head = record_of(version).get("bucket_head")
    return head if isinstance(head, str) else None
