"""Replicated (DDP) state on several ranks: one commit for the whole job, and loads that
need not download the state once per rank.

Both calls are collective: every rank calls them, in the same order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from cloudckpt import errors, tree
from cloudckpt.blobs import TransferStats
from cloudckpt.blobs.writer import BlobResult, assemble
from cloudckpt.commit import Start
from cloudckpt.distributed.collectives import Group
from cloudckpt.lease import WriterLease
from cloudckpt.repo import Repo
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
    """

    write: Literal["rank0", "spread"] = "rank0"
    read: Literal["each", "rank0", "spread"] = "each"

    def __post_init__(self) -> None:
        if self.write not in ("rank0", "spread") or self.read not in ("each", "rank0", "spread"):
            raise ValueError(f"unknown mode in {self}")


def shares(sizes: list[int], world: int) -> list[int]:
    """The rank that handles each item: largest first, to the least loaded rank."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += sizes[i]
    return owner


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
        branch=branch, step=step, metrics=metrics, message=message, fast_forward=fast_forward
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
        outcome = _attempt(on_rank0) if group.rank == 0 else {}
    else:
        outcome = _spread(repo, state, group, meta, kwargs, lease, before_publish)
    return _outcome(group.broadcast_json(outcome, src=0), group)


def _spread(
    repo: Repo,
    state: Any,
    group: Group,
    meta: dict[str, Any],
    kwargs: dict[str, Any],
    lease: WriterLease | None,
    before_publish: Callable[[], None] | None,
) -> dict[str, Any]:
    txn = repo.transaction(**kwargs)

    def begin() -> Start:
        txn.request = dataclasses.replace(txn.request, fence=_fence(lease))
        return txn.begin().start  # type: ignore[return-value]

    # Rank 0 begins the transaction; every rank uploads against the parent it read, and
    # its publish knows when the uploads started (a garbage collection since then makes
    # it check the blobs first).
    begun = _attempt(begin) if group.rank == 0 else {}
    begun = group.broadcast_json(begun, src=0)
    if "error" in begun:
        return begun
    try:
        skeleton, leaves = tree.flatten(state)
        if group.rank != 0:
            txn.start = Start.from_json(begun["version"])
            txn.begin()
        writer = txn.writer()
        planned = writer.plan(leaves)
        owner = shares([b.size for b in planned], group.world)
        results = writer.upload(
            leaves, planned, [n for n, r in enumerate(owner) if r == group.rank]
        )
        report: dict[str, Any] = {"results": {str(n): list(r) for n, r in results.items()}}
    except Exception as e:  # reported to every rank, raised everywhere below
        report = {"error": f"rank {group.rank}: {type(e).__name__}: {e}", "type": _kind(e)}
    reports = group.all_gather_json(report)
    failed = [r for r in reports if "error" in r]
    if failed:
        return {"error": "; ".join(r["error"] for r in failed), "type": failed[0]["type"]}
    if group.rank != 0:
        return {}
    merged = {int(n): BlobResult(*r) for rep in reports for n, r in rep["results"].items()}
    per_rank = [sum(r[1] for r in rep["results"].values() if r[2]) for rep in reports]
    meta["ranks"] = {"world": group.world, "write": "spread", "uploaded_bytes": per_rank}

    def publish() -> Version:
        if before_publish is not None:
            before_publish()
        entries, stats = assemble(leaves, planned, merged)
        txn.request = dataclasses.replace(txn.request, meta=meta)
        return txn.publish(skeleton, entries, stats)

    return _attempt(publish)


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
    if not group.distributed:
        return fn()
    outcome: dict[str, Any] = {}
    if group.rank == 0:
        try:
            outcome = {"value": fn()}
        except Exception as e:  # reported to every rank
            outcome = {"error": f"rank 0: {type(e).__name__}: {e}", "type": _kind(e)}
    outcome = group.broadcast_json(outcome, src=0)
    if "error" in outcome:
        raise _error_class(outcome.get("type", ""))(outcome["error"])
    return outcome["value"]


def _error_class(name: str) -> type[errors.CloudCkptError]:
    cls = getattr(errors, name, errors.CloudCkptError)
    ok = isinstance(cls, type) and issubclass(cls, errors.CloudCkptError)
    return cls if ok else errors.CloudCkptError


def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """``{"version": the result as JSON}``, or ``{"error": ..., "type": ...}``."""
    try:
        return {"version": dataclasses.asdict(fn())}
    except Exception as e:  # reported to every rank
        return {"error": f"rank 0: {type(e).__name__}: {e}", "type": _kind(e)}


def _kind(e: BaseException) -> str:
    return type(e).__name__ if isinstance(e, errors.CloudCkptError) else "CloudCkptError"


def _outcome(outcome: dict[str, Any], group: Group) -> Version:
    if "error" in outcome:
        raise _error_class(outcome.get("type", ""))(
            f"distributed save failed, no version was published: {outcome['error']}"
        )
    return Version.from_dict(outcome["version"])


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
        state, error = _try(lambda: repo.load(ref, into=into))
        _raise_any(group, error)
        return state

    def fetch(targets: list[tuple[dict[str, Any], Any]]) -> TransferStats:
        sizes = [_as_tensor(dest).nbytes for _, dest in targets]
        owner = [0] * len(targets) if options.read == "rank0" else shares(sizes, group.world)
        mine = [t for t, r in zip(targets, owner, strict=True) if r == group.rank]
        stats, error = _try(lambda: repo.reader().read(mine))
        _raise_any(group, error)
        for (_, dest), rank in zip(targets, owner, strict=True):
            group.broadcast_tensor(_as_tensor(dest), src=rank)
        return stats

    state, error = _try(lambda: repo.load(ref, into=into, fetch=fetch))
    _raise_any(group, error)
    return state


def _try(fn: Callable[[], Any]) -> tuple[Any, dict[str, str] | None]:
    try:
        return fn(), None
    except Exception as e:  # agreed on by every rank before raising
        if getattr(e, "agreed_by_all_ranks", False):
            raise
        return None, {"error": f"{type(e).__name__}: {e}", "type": _kind(e)}


def _raise_any(group: Group, error: dict[str, str] | None) -> None:
    found = group.all_gather_json(error)
    failed = [(rank, e) for rank, e in enumerate(found) if e is not None]
    if failed:
        cls = _error_class(failed[0][1]["type"])
        exc = cls("; ".join(f"rank {rank}: {e['error']}" for rank, e in failed))
        exc.agreed_by_all_ranks = True  # type: ignore[attr-defined]
        raise exc


def _as_tensor(array: Any) -> torch.Tensor:
    return torch.from_numpy(array) if isinstance(array, np.ndarray) else array
