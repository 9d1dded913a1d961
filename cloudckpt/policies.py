"""When to save, and which versions to keep: small composable policy objects.

A save policy answers ``reason(step, metrics, now)`` with a reason to save now, or None.
A retention policy answers ``keep(versions)`` with the ids it wants kept. The manager
saves when any save policy gives a reason, and keeps the union of what every retention
policy keeps -- plus, always, the newest version and the one the run resumed from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from cloudckpt.versions import Version

Mode = Literal["min", "max"]


class SavePolicy(Protocol):
    def start(self, step: int, now: float) -> None:
        """Told when the run starts or resumes."""

    def reason(self, step: int, metrics: Mapping[str, float], now: float) -> str | None:
        """Why to save at this step, or None."""

    def saved(self, step: int, metrics: Mapping[str, float], now: float) -> None:
        """Told after every save, whichever policy asked for it."""


class RetentionPolicy(Protocol):
    def keep(self, versions: Sequence[Version]) -> set[str]:
        """The ids of ``versions`` (oldest first) this policy wants kept."""


def _finite(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return value if value is not None and math.isfinite(value) else None


def _better(value: float, best: float | None, mode: Mode) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


@dataclass
class EveryNSteps:
    """Save every ``n`` steps (the textbook's autosave)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("EveryNSteps needs n >= 1")

    def start(self, step: int, now: float) -> None:
        pass

    def reason(self, step: int, metrics: Mapping[str, float], now: float) -> str | None:
        return f"every {self.n} steps" if step % self.n == 0 else None

    def saved(self, step: int, metrics: Mapping[str, float], now: float) -> None:
        pass


@dataclass
class EveryMinutes:
    """Save when ``minutes`` of wall clock have passed since the last save (or start).

    ``now`` comes from the manager's clock, which tests can inject.
    """

    minutes: float
    _last: float | None = field(default=None, repr=False)

    def start(self, step: int, now: float) -> None:
        self._last = now

    def reason(self, step: int, metrics: Mapping[str, float], now: float) -> str | None:
        if self._last is None:
            self._last = now
        if now - self._last >= self.minutes * 60:
            return f"every {self.minutes:g} minutes"
        return None

    def saved(self, step: int, metrics: Mapping[str, float], now: float) -> None:
        self._last = now


@dataclass
class OnBestMetric:
    """Save when ``metric`` reaches a new best (lowest for ``mode="min"``). Non-finite
    values (nan, inf) never count as best."""

    metric: str
    mode: Mode = "min"
    best: float | None = None

    def start(self, step: int, now: float) -> None:
        pass

    def reason(self, step: int, metrics: Mapping[str, float], now: float) -> str | None:
        value = _finite(metrics, self.metric)
        if value is not None and _better(value, self.best, self.mode):
            return f"best {self.metric} {value:.6g}"
        return None

    def saved(self, step: int, metrics: Mapping[str, float], now: float) -> None:
        value = _finite(metrics, self.metric)
        if value is not None and _better(value, self.best, self.mode):
            self.best = value

    def seed(self, versions: Sequence[Version]) -> None:
        """Start from the best value already committed (after a resume)."""
        for v in versions:
            self.saved(v.step or 0, v.metrics, 0.0)


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``k`` newest versions (the textbook's rolling window)."""

    k: int

    def keep(self, versions: Sequence[Version]) -> set[str]:
        return {v.id for v in versions[-self.k :]} if self.k > 0 else set()


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` versions with the best finite ``metric``."""

    k: int
    metric: str
    mode: Mode = "min"

    def keep(self, versions: Sequence[Version]) -> set[str]:
        scored = [(_finite(v.metrics, self.metric), v.id) for v in versions]
        ranked = sorted(
            ((s, vid) for s, vid in scored if s is not None), reverse=self.mode == "max"
        )
        return {vid for _, vid in ranked[: self.k]}


@dataclass(frozen=True)
class KeepEvery:
    """Keep every version whose step is a multiple of ``n`` forever (milestones)."""

    n: int

    def keep(self, versions: Sequence[Version]) -> set[str]:
        return {v.id for v in versions if v.step is not None and v.step % self.n == 0}


@dataclass(frozen=True)
class SaveFailures:
    """How long a run trains on while periodic saves fail (the store is unreachable).

    A failed periodic save, synchronous or in the background, is logged as an error and
    counted (``CheckpointManager.failed_saves``), and training goes on: the next save
    point tries again. The run raises once ``max_consecutive`` saves failed in a row, or
    no save succeeded for ``max_minutes`` (since the last success or the start of the
    run), whichever comes first. A final save (preemption, ``close()``, the end of a
    ``with`` block) raises at once. Only store failures are survived: a lost writer
    lease or a conflicting writer raises as before.
    """

    max_consecutive: int = 3
    max_minutes: float = 30.0

    def __post_init__(self) -> None:
        if self.max_consecutive < 1 or not self.max_minutes > 0:
            raise ValueError("max_consecutive must be >= 1 and max_minutes > 0")

    def gives_up(self, consecutive: int, seconds_since_success: float) -> bool:
        return consecutive >= self.max_consecutive or seconds_since_success >= 60 * self.max_minutes
