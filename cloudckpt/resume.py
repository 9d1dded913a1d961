"""What exact resume needs besides model and optimizer: the run's step, epoch and extra
state, the RNG states, and the data position."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from cloudckpt import schema
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.versions import Version

#: Key of the manager's own entries (step, epoch, extra state, RNG) in a committed state.
META_KEY = "_cloudckpt"


def capture_rng() -> dict[str, Any]:
    """The state of every random number generator a training step may draw from."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` captured (CUDA only where devices match)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass(frozen=True)
class RunRecord:
    """Where a run stands, saved with its state under :data:`META_KEY`."""

    step: int
    epoch: int = 0
    extra: Any = None

    def dump(self) -> dict[str, Any]:
        """The entry to save, with the RNG states as they are now."""
        return {"rng": capture_rng(), "step": self.step, "epoch": self.epoch, "extra": self.extra}

    @classmethod
    def restore(cls, state: Any, version: Version, where: str) -> RunRecord:
        """Read the record of ``version``'s loaded ``state`` and put its RNG states back.

        A version without one (committed by ``Repo.commit``) starts at its own step.
        Raises CorruptCheckpoint naming ``where`` if the record is malformed.
        """
        own = state.get(META_KEY, {}) if isinstance(state, dict) else {}
        try:
            if not isinstance(own, dict):
                raise TypeError(f"{META_KEY!r} is a {type(own).__name__}")
            step = schema.integer(own.get("step", version.step or 0), 0)
            epoch = schema.integer(own.get("epoch", 0), 0)
            if "rng" in own:
                restore_rng(own["rng"])
        except (
            schema.Invalid,
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            RuntimeError,
            OverflowError,
        ) as e:
            raise CorruptCheckpoint(
                f"{where} version {version.id}: its step, epoch or RNG record is "
                f"malformed ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        return cls(step, epoch, own.get("extra"))


class ResumableSampler(Sampler[int]):
    """A sampler for map-style datasets that remembers where it is.

    Each epoch is a permutation seeded by ``seed + epoch`` (or ``range(n)`` without
    shuffling). ``state_dict()`` records the epoch and how many indices were drawn, so a
    resumed run continues with the very next sample. Register it with the manager
    (``mgr.restore(sampler=sampler, ...)``).

    The position counts indices handed out, which equals the samples consumed for a
    ``DataLoader`` with ``num_workers=0``; with worker processes, prefetched batches
    count as consumed and are skipped on resume.

    With ``world_size`` ranks (data parallel), rank ``rank`` takes every
    ``world_size``-th index of the shared permutation; the state is the same on every
    rank, so it is saved once for the whole job.
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.n // self.world_size

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self._order()[self.rank :: self.world_size][: len(self)]
        while self.position < len(order):
            index = order[self.position]
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n": self.n,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"sampler was saved for {state['n']} samples, this one has {self.n}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])


@contextlib.contextmanager
def python_rng_untouched() -> Iterator[None]:
    """Network libraries draw from Python's global ``random`` (aiohttp shuffles waiting
    connections, tenacity jitters retries); a save must not shift the training run's
    stream, or a resumed run would diverge from an uninterrupted one."""
    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


def registered(objects: dict[str, Any]) -> dict[str, Any]:
    """The objects a manager checkpoints, checked: each has ``state_dict`` and
    ``load_state_dict``, and none takes the name of the run's own record."""
    for name, obj in objects.items():
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"{name}: {type(obj).__name__} has no state_dict/load_state_dict")
    if META_KEY in objects:
        raise ValueError(f"{META_KEY!r} is reserved")
    return dict(objects)
