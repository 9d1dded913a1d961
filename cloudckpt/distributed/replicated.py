"""Replicated (DDP) state on several ranks: one commit for the whole job, and loads that
need not download the state once per rank.

Both calls are collective: every rank calls them, in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from cloudckpt import tree
from cloudckpt.blobs import BlobReader, TransferStats
from cloudckpt.blobs.writer import BlobResult, Planned, assemble
from cloudckpt.commit import CommitRequest, Start, Transaction
from cloudckpt.distributed.collectives import Group
from cloudckpt.lease import WriterLease
from cloudckpt.repo import Repo
from cloudckpt.tree import Leaf
from cloudckpt.versions import Version


@dataclass(frozen=True)
class DistributedOptions:
    """How the ranks of a job share the work on replicated state.

    ``write``: ``"rank0"`` (default) -- rank 0 uploads while the others wait;
    ``"spread"`` -- each rank uploads a disjoint share of the blobs, balanced by bytes,
    so upload bandwidth grows with the number of ranks; rank 0 then publishes.

    ``read``: ``"each"`` (default) -- every rank downloads the whole state, in parallel;
    ``"rank0"`` -- rank 0 downloads and broadcasts; ``"spread"`` -- each rank downloads a
    share and broadcasts it (the state leaves the store once, not once per rank).

    ``timeout``: the most seconds a rank waits for another in the checkpoint's own gloo
    groups -- a collective, a frame of a peer replica transfer. A rank killed, frozen
    (SIGSTOP, a paused VM) or cut off during a save or a restore fails it on every other
    rank within that time with :class:`~cloudckpt.errors.RanksUnreachable`; local saves
    that landed are kept. It must exceed the longest a rank legitimately waits for
    another: every ``step()`` waits for the slowest rank, the others wait while rank 0
    uploads a bucket save, and hosts wait for each other's local save before a replica
    transfer.
    """

    write: Literal["rank0", "spread"] = "rank0"
    read: Literal["each", "rank0", "spread"] = "each"
    timeout: float = 1800.0

    def __post_init__(self) -> None:
        if self.write not in ("rank0", "spread") or self.read not in ("each", "rank0", "spread"):
            raise ValueError(f"unknown mode in {self}")
        if not 0 < self.timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, not {self.timeout}")


def shares(sizes: list[int], world: int) -> list[int]:
    """The rank that handles each item: largest first, to the least loaded rank."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


#: What a failed distributed save's error says first.
SAVE_FAILED = "distributed save failed, no version was published: "


def commit(
    repo: Repo,
    state: Any,
    group: Group,
    options: DistributedOptions | None = None,
    *,
    branch: str = "main",
    step: int | None = None,
    metrics: Mapping[str, float] | None = None,
    message: str | None = None,
    meta: Mapping[str, Any] | None = None,
    fast_forward: bool = False,
    lease: WriterLease | None = None,
    before_publish: Callable[[], None] | None = None,
) -> Version:
    """Commit ``state``, the same on every rank, as one version. If any rank fails, no
    version appears and every rank raises. ``lease`` (rank 0's writer lease) is taken if
    it is not held yet and its fencing token goes with the commit. ``before_publish``
    runs on rank 0 just before the version is published (e.g. a lease check)."""
    options = options or DistributedOptions()
    kwargs: dict[str, Any] = dict(
        branch=branch,
        step=step,
        metrics=dict(metrics or {}),
        message=message,
        fast_forward=fast_forward,
    )
    meta = dict(meta or {})

    def on_rank0() -> Version:
        fence = _fence(lease)
        if before_publish is not None:
            before_publish()
        return repo.commit(state, meta=meta, fence=fence, **kwargs)

    if not group.distributed:
        return on_rank0()
    if options.write == "rank0":
        meta["ranks"] = {"world": group.world, "write": "rank0"}
        published = group.from_rank0(lambda: dataclasses.asdict(on_rank0()), context=SAVE_FAILED)
    else:
        txn = Transaction(
            repo.store, repo.options.transfer, CommitRequest(**kwargs), cache=repo.cache
        )
        save = _SpreadSave(txn, state, group, meta, lease, before_publish)
        # Rank 0 begins the transaction; every rank uploads against the parent it read,
        # and its publish knows when the uploads started (a garbage collection since then
        # makes it check the blobs first).
        start = Start.from_json(group.from_rank0(save.begin, context=SAVE_FAILED))
        published = group.all_reduce(lambda: save.upload(start), save.publish, context=SAVE_FAILED)
    return Version.from_dict(published)


@dataclass
class _SpreadSave:
    """A commit whose blobs each rank uploads a share of; rank 0 begins and publishes."""

    txn: Transaction
    state: Any
    group: Group
    meta: dict[str, Any]
    lease: WriterLease | None
    before_publish: Callable[[], None] | None
    skeleton: Any = None
    leaves: list[Leaf] = field(default_factory=list)
    planned: list[Planned] = field(default_factory=list)

    def begin(self) -> dict[str, Any]:
        """Rank 0's start of the transaction, as JSON for the other ranks."""
        self.txn.request = dataclasses.replace(self.txn.request, fence=_fence(self.lease))
        start = self.txn.begin().start
        assert start is not None  # begin() reads it
        return start.to_json()

    def upload(self, start: Start) -> dict[str, list[Any]]:
        """This rank's share of the blobs, uploaded: ``{blob number: BlobResult}``."""
        self.skeleton, self.leaves = tree.flatten(self.state)
        if self.group.rank != 0:
            self.txn.start = start
            self.txn.begin()
        writer = self.txn.writer()
        self.planned = writer.plan(self.leaves)
        owner = shares([b.size for b in self.planned], self.group.world)
        mine = [n for n, r in enumerate(owner) if r == self.group.rank]
        results = writer.upload(self.leaves, self.planned, mine)
        return {str(n): list(r) for n, r in results.items()}

    def publish(self, uploads: list[dict[str, list[Any]]]) -> dict[str, Any]:
        """Rank 0 publishes the version from every rank's uploads (JSON)."""
        merged = {int(n): BlobResult(*r) for done in uploads for n, r in done.items()}
        per_rank = [sum(r[1] for r in done.values() if r[2]) for done in uploads]
        self.meta["ranks"] = {
            "world": self.group.world,
            "write": "spread",
            "uploaded_bytes": per_rank,
        }
        if self.before_publish is not None:
            self.before_publish()
        entries, stats = assemble(self.leaves, self.planned, merged)
        self.txn.request = dataclasses.replace(self.txn.request, meta=self.meta)
        return dataclasses.asdict(self.txn.publish(self.skeleton, entries, stats))


def _fence(lease: WriterLease | None) -> int | None:
    """The fencing token of ``lease``, taken first if it is not held (rank 0 only)."""
    if lease is None:
        return None
    if not lease.held:
        lease.acquire()
    lease.check()
    return lease.fence


def from_rank0(group: Group, fn: Callable[[], Any]) -> Any:
    """``fn()`` (a JSON value) computed on rank 0 and the same on every rank; if it
    raises, every rank raises the same kind of error (no rank is left waiting)."""
    return group.from_rank0(fn)


def load(
    repo: Repo,
    ref: str,
    group: Group,
    options: DistributedOptions | None = None,
    *,
    into: Any = None,
) -> Any:
    """Load a version of replicated state on every rank (collective); if any rank fails,
    every rank raises (CorruptCheckpoint when the data was at fault)."""
    options = options or DistributedOptions()
    if not group.distributed:
        return repo.load(ref, into=into)
    if options.read == "each":
        return group.on_each_rank(lambda: repo.load(ref, into=into))

    def fetch(targets: list[tuple[dict[str, Any], Any]]) -> TransferStats:
        sizes = [_as_tensor(dest).nbytes for _, dest in targets]
        owner = [0] * len(targets) if options.read == "rank0" else shares(sizes, group.world)
        mine = [t for t, r in zip(targets, owner, strict=True) if r == group.rank]
        reader = BlobReader(repo.store, repo.options.transfer, repo.cache)
        stats = group.on_each_rank(lambda: reader.read(mine))
        for (_, dest), rank in zip(targets, owner, strict=True):
            group.broadcast_tensor(_as_tensor(dest), src=rank)
        return stats

    return group.on_each_rank(lambda: repo.load(ref, into=into, fetch=fetch))


def _as_tensor(array: Any) -> torch.Tensor:
    return torch.from_numpy(array) if isinstance(array, np.ndarray) else array
