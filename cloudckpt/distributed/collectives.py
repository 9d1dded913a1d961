"""The few collectives cloudckpt needs, over a gloo group of its own.

A dedicated group keeps checkpoint traffic apart from the training's own collectives
(NCCL, or gloo used by DDP from another thread), so an async save's commit never
interleaves with a gradient all-reduce. Messages are JSON in uint8 tensors: nothing
between ranks is pickled either.

A step that every rank takes fails on every rank when it fails on one (no rank is left
waiting in a collective): :meth:`Group.all_reduce` catches each rank's error, shares it as a
:class:`~cloudckpt.errors.RankFailure` and raises one :class:`~cloudckpt.errors.RanksFailed`
everywhere, as ``torch.distributed.checkpoint``'s ``_DistWrapper`` does.

A rank that stops answering cannot share anything: every wait on another rank is bounded
by the group's ``timeout`` and a rank that waited that long, or whose peer's connection
closed, raises :class:`~cloudckpt.errors.RanksUnreachable` (the group is done for).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cloudckpt.errors import RankFailure, RanksFailed, RanksUnreachable

T = TypeVar("T")
R = TypeVar("R")


class Group:
    """This process's rank among ``world`` ranks; a single process is rank 0 of 1.

    ``timeout``: the seconds ``pg`` waits for another rank in one operation (None: not
    known here), named in the error when a rank does not answer."""

    def __init__(self, pg: Any = None, timeout: float | None = None) -> None:
        self.pg, self.timeout = pg, timeout
        self.rank = dist.get_rank() if pg is not None else 0
        self.world = dist.get_world_size() if pg is not None else 1

    @classmethod
    def detect(cls, timeout: float = 1800.0) -> Group:
        """The current job's ranks (a new gloo group, created collectively, whose every
        wait on another rank gives up after ``timeout`` seconds), or a group of one when
        torch.distributed is not initialized."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        return cls(pg, timeout)

    @contextmanager
    def answering(self, what: str) -> Iterator[None]:
        """Run torch.distributed calls of this group; the failure of one -- a rank that
        did not answer in time, or whose connection closed -- raises RanksUnreachable
        saying so (``what``: what this rank was doing)."""
        try:
            yield
        except RuntimeError as e:  # gloo's timeouts and closed connections
            wait = "its timeout" if self.timeout is None else f"{self.timeout:g} s"
            raise RanksUnreachable(
                f"{what} failed: {e} -- a rank of the job was killed, is frozen or is cut "
                f"off (this group waits {wait} for a rank: DistributedOptions(timeout=...)). "
                "The ranks can no longer agree: restart the job; what was saved is kept"
            ) from e

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world={self.world})"

    def all_reduce(
        self,
        map_fn: Callable[[], T] | None,
        reduce_fn: Callable[[list[T]], R],
        *,
        context: str = "",
    ) -> R:
        """``map_fn()`` on every rank; their values (JSON), in rank order, to ``reduce_fn``
        on rank 0; its value (JSON) on every rank. ``map_fn=None``: nothing to gather,
        rank 0 computes alone.

        If either raises, on any rank, every rank raises the same
        :class:`~cloudckpt.errors.RanksFailed` (its message ``context`` and then each failed
        rank's); one that ``map_fn`` raises, from a step of its own on every rank, passes
        on its failures. In a single process the calls are plain calls.
        """
        if not self.distributed:
            return reduce_fn([] if map_fn is None else [map_fn()])
        mapped: list[Any] = []
        if map_fn is not None:
            outcomes = self.all_gather_json(_outcome(map_fn, self.rank))
            mapped = _values(outcomes, context)
        reduced = _outcome(lambda: reduce_fn(mapped), self.rank) if self.rank == 0 else None
        return _values([self.broadcast_json(reduced, src=0)], context)[0]

    def from_rank0(self, fn: Callable[[], R], *, context: str = "") -> R:
        """``fn()`` (a JSON value) computed on rank 0 and the same on every rank; if it
        raises, every rank raises."""
        return self.all_reduce(None, lambda _: fn(), context=context)

    def on_each_rank(self, fn: Callable[[], T], *, context: str = "") -> T:
        """``fn()`` on every rank, returned (unshared) once every rank's call returned; if
        any raised, every rank raises."""
        here: list[T] = []
        self.all_reduce(lambda: here.append(fn()), lambda _: None, context=context)
        return here[0]

    def agree(self, flags: list[float]) -> list[float]:
        """The element-wise maximum of ``flags`` over all ranks."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float64)
        with self.answering(f"rank {self.rank}'s all-reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return t.tolist()

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        if not self.distributed:
            return obj
        data = _encode(obj) if self.rank == src else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        with self.answering(f"rank {self.rank}'s broadcast from rank {src}"):
            dist.broadcast(size, src=src, group=self.pg)
            if self.rank != src:
                data = torch.empty(int(size.item()), dtype=torch.uint8)
            dist.broadcast(data, src=src, group=self.pg)
        return json.loads(bytes(data.numpy()))

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        data = _encode(obj)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        with self.answering(f"rank {self.rank}'s all-gather"):
            dist.all_gather(sizes, size, group=self.pg)
            longest = max(int(s.item()) for s in sizes)
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[: data.numel()] = data
            out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(out, padded, group=self.pg)
        return [
            json.loads(bytes(o[: int(s.item())].numpy())) for o, s in zip(out, sizes, strict=True)
        ]

    def broadcast_tensor(self, t: torch.Tensor, src: int) -> None:
        """Overwrite ``t`` (a CPU tensor) on every rank with rank ``src``'s bytes."""
        if not self.distributed or t.numel() == 0:
            return
        target = t if t.is_contiguous() else t.contiguous()
        view = target.reshape(-1).view(torch.uint8)  # bytes: every dtype, bit-exact
        with self.answering(f"rank {self.rank}'s broadcast from rank {src}"):
            dist.broadcast(view, src=src, group=self.pg)
        if target is not t:
            t.copy_(target)

    def barrier(self) -> None:
        if self.distributed:
            with self.answering(f"rank {self.rank}'s barrier"):
                dist.barrier(group=self.pg)


def _outcome(fn: Callable[[], Any], rank: int) -> dict[str, Any]:
    """``{"value": fn()}``, or ``{"failures": [...]}`` (as JSON) when it raised."""
    try:
        return {"value": fn()}
    except RanksFailed as e:  # a step of its own failed on every rank: pass its records on
        failures = list(e.failures.values())
    except Exception as e:  # shared with every rank, raised on each
        failures = [RankFailure.of(rank, e)]
    return {"failures": [dataclasses.asdict(f) for f in failures]}


def _values(outcomes: list[dict[str, Any]], context: str) -> list[Any]:
    """Each outcome's value, or the one error for all their failures."""
    failures = [RankFailure(**f) for o in outcomes for f in o.get("failures", ())]
    if failures:
        raise RanksFailed.of(failures, context)
    return [o["value"] for o in outcomes]


def _encode(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
