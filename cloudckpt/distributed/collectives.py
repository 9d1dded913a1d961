"""The few collectives cloudckpt needs, over a gloo group of its own.

A dedicated group keeps checkpoint traffic apart from the training's own collectives
(NCCL, or gloo used by DDP from another thread), so an async save's commit never
interleaves with a gradient all-reduce. Messages are JSON in uint8 tensors: nothing
between ranks is pickled either.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import torch
import torch.distributed as dist


class Group:
    """This process's rank among ``world`` ranks; a single process is rank 0 of 1."""

    def __init__(self, pg: Any = None) -> None:
        self.pg = pg
        self.rank = dist.get_rank() if pg is not None else 0
        self.world = dist.get_world_size() if pg is not None else 1

    @classmethod
    def detect(cls, timeout: float = 1800.0) -> Group:
        """The current job's ranks (a new gloo group, created collectively), or a group
        of one when torch.distributed is not initialized."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        return cls(pg)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world={self.world})"

    def agree(self, flags: list[float]) -> list[float]:
        """The element-wise maximum of ``flags`` over all ranks."""
        if not self.distributed:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pg)
        return t.tolist()

    def broadcast_json(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        if not self.distributed:
            return obj
        data = _encode(obj) if self.rank == src else torch.empty(0, dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
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
        dist.broadcast(view, src=src, group=self.pg)
        if target is not t:
            t.copy_(target)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)


def _encode(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
