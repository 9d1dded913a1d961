"""When to save, and which versions to keep: small composable policy objects.

A save policy answers ``reason(candidate, history)`` with a reason to save the step
``candidate`` now, or None; it keeps no state of its own: what it needs of the past (the
saves so far, their steps, times and metrics) is in ``history``, a :class:`RunHistory`
the manager keeps, seeded on resume from the versions already on the branch. A retention
policy answers ``keep(versions)`` with the ids it wants kept. The manager saves when any
save policy gives a reason, and keeps the union of what every retention policy keeps --
plus, always, the newest version, the one the run resumed from, and any version a branch
or tag points to. :meth:`Policies.from_keywords` builds every policy of a manager from
its keywords (``save_every_steps=`` ...), in this one place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from cloudckpt.errors import StoreError
from cloudckpt.gc import DEFAULT_GRACE
from cloudckpt.versions import Version

log = logging.getLogger("cloudckpt")

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class SavePoint:
    """A step as the save policies see it: the one to decide on, or a save so far."""

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    #: The manager's clock (``clock=``) when the step was reported or the save made;
    #: None for versions committed before this run resumed (another process's clock).
    time: float | None = None


@dataclass
class RunHistory:
    """What save policies know of the run: when it started or resumed (``started``, on
    the manager's clock) and its saves, oldest first -- the branch's versions when the
    run resumed, then every save this run made (recorded when the save starts)."""

    started: float
    saves: list[SavePoint] = field(default_factory=list)
    _best: dict[tuple[str, Mode], float | None] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def resumed(cls, versions: Iterable[Version], now: float) -> RunHistory:
        """The history of a run resuming at ``now`` on a branch holding ``versions``."""
        saves = [SavePoint(v.step or 0, dict(v.metrics)) for v in versions]
        return cls(now, saves)

    def record(self, save: SavePoint) -> None:
        """Add a save of this run."""
        self.saves.append(save)
        for (metric, mode), best in self._best.items():
            value = _finite(save.metrics, metric)
            if value is not None and _better(value, best, mode):
                self._best[metric, mode] = value

    @property
    def last_save_time(self) -> float:
        """The time of this run's newest save, or ``started`` before its first."""
        times = (s.time for s in reversed(self.saves) if s.time is not None)
        return next(times, self.started)

    def best(self, metric: str, mode: Mode = "min") -> float | None:
        """The best finite value of ``metric`` saved so far (lowest for ``"min"``)."""
        if (metric, mode) not in self._best:
            best = None
            for save in self.saves:
                value = _finite(save.metrics, metric)
                if value is not None and _better(value, best, mode):
                    best = value
            self._best[metric, mode] = best
        return self._best[metric, mode]


class SavePolicy(Protocol):
    """When to save: any object with this ``reason`` method (pass it in
    ``save_policies=``). It keeps no state: what it needs of the past is in ``history``,
    which the manager keeps. Decided on rank 0 in a job of several ranks."""

    def reason(self, candidate: SavePoint, history: RunHistory) -> str | None:
        """Why to save the step ``candidate`` now (recorded with the version), or None."""


class RetentionPolicy(Protocol):
    """Which versions to keep: any object with this ``keep`` method (pass it in
    ``retention=``). The union of what every policy keeps is kept."""

    def keep(self, versions: Sequence[Version]) -> set[str]:
        """The ids of ``versions`` (the branch's, oldest first) this policy wants kept."""


def _finite(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return value if value is not None and math.isfinite(value) else None


def _better(value: float, best: float | None, mode: Mode) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


@dataclass(frozen=True)
class EveryNSteps:
    """Save every ``n`` steps (the textbook's autosave)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("EveryNSteps needs n >= 1")

    def reason(self, candidate: SavePoint, history: RunHistory) -> str | None:
        return f"every {self.n} steps" if candidate.step % self.n == 0 else None


@dataclass(frozen=True)
class EveryMinutes:
    """Save when ``minutes`` have passed since this run's last save (or its start), on
    the manager's clock, which tests can inject."""

    minutes: float

    def reason(self, candidate: SavePoint, history: RunHistory) -> str | None:
        if candidate.time is None or candidate.time - history.last_save_time < self.minutes * 60:
            return None
        return f"every {self.minutes:g} minutes"


@dataclass(frozen=True)
class OnBestMetric:
    """Save when ``metric`` reaches a new best (lowest for ``mode="min"``) of every save
    so far, the branch's earlier versions included. Non-finite values (nan, inf) never
    count as best."""

    metric: str
    mode: Mode = "min"

    def reason(self, candidate: SavePoint, history: RunHistory) -> str | None:
        value = _finite(candidate.metrics, self.metric)
        if value is not None and _better(value, self.best(history), self.mode):
            return f"best {self.metric} {value:.6g}"
        return None

    def best(self, history: RunHistory) -> float | None:
        """The best value saved so far."""
        return history.best(self.metric, self.mode)


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


class FailedSaves:
    """Periodic saves that failed in a row, survived until :class:`SaveFailures` gives up."""

    def __init__(self, policy: SaveFailures, now: float) -> None:
        self.policy = policy
        #: Failures since the last successful save.
        self.count = 0
        self.last_success = now

    def succeeded(self, now: float) -> None:
        self.count, self.last_success = 0, now

    def failed(self, error: StoreError, now: float) -> None:
        """Count ``error``, logged; raise StoreError once the run gives up."""
        self.count += 1
        down = now - self.last_success
        if self.policy.gives_up(self.count, down):
            raise StoreError(
                f"{self.count} saves in a row failed and none succeeded for "
                f"{down / 60:.1f} min (giving up by {self.policy}); the last: {error}"
            ) from error
        log.error(
            "a save failed (%d in a row; training goes on and the next save point tries "
            "again; the run stops after %d in a row or %.0f min without a save): %s",
            self.count,
            self.policy.max_consecutive,
            self.policy.max_minutes,
            error,
        )


def prunable(
    versions: Sequence[Version], policies: Sequence[RetentionPolicy], protected: Iterable[str]
) -> list[str]:
    """The ids of ``versions`` (a branch's, oldest first) that no retention policy keeps.

    Without any policy everything is kept. The newest version and ``protected`` (the one
    the run resumed from, those a branch or tag points to) are always kept.
    """
    if not policies or not versions:
        return []
    keep = {versions[-1].id, *protected}
    for policy in policies:
        keep |= policy.keep(versions)
    return [v.id for v in versions if v.id not in keep]


@dataclass(frozen=True)
class Policies:
    """Every save and retention policy of a manager, and when pruned data is collected:
    every ``gc_every`` prunings, the data of pruned versions older than ``gc_grace``
    seconds (0: never)."""

    save: tuple[SavePolicy, ...] = ()
    retention: tuple[RetentionPolicy, ...] = ()
    gc_every: int = 10
    gc_grace: float = DEFAULT_GRACE

    @classmethod
    def from_keywords(
        cls,
        *,
        save_every_steps: int | None = None,
        save_every_minutes: float | None = None,
        best_metric: str | None = None,
        best_mode: Mode = "min",
        keep_last: int | None = None,
        keep_best: int = 0,
        keep_every: int | None = None,
        save_policies: Sequence[SavePolicy] = (),
        retention: Sequence[RetentionPolicy] = (),
        gc_every: int = 10,
        gc_grace: float = DEFAULT_GRACE,
    ) -> Policies:
        """The policies :class:`~cloudckpt.CheckpointManager`'s keywords stand for:
        ``save_policies`` plus :class:`EveryNSteps` (``save_every_steps``),
        :class:`EveryMinutes` (``save_every_minutes``) and :class:`OnBestMetric`
        (``best_metric``, ``best_mode``); ``retention`` plus :class:`KeepLast`
        (``keep_last``), :class:`KeepBest` (``keep_best`` by ``best_metric``) and
        :class:`KeepEvery` (``keep_every``)."""
        save: list[SavePolicy] = list(save_policies)
        if save_every_steps:
            save.append(EveryNSteps(save_every_steps))
        if save_every_minutes:
            save.append(EveryMinutes(save_every_minutes))
        if best_metric:
            save.append(OnBestMetric(best_metric, best_mode))
        keep: list[RetentionPolicy] = list(retention)
        if keep_last:
            keep.append(KeepLast(keep_last))
        if keep_best:
            if not best_metric:
                raise ValueError("keep_best needs best_metric")
            keep.append(KeepBest(keep_best, best_metric, best_mode))
        if keep_every:
            keep.append(KeepEvery(keep_every))
        return cls(tuple(save), tuple(keep), gc_every, gc_grace)

    def reasons(self, candidate: SavePoint, history: RunHistory) -> list[str]:
        """Why to save ``candidate``, one reason per save policy that asks for it."""
        return [r for p in self.save if (r := p.reason(candidate, history))]

    def gc_due(self, prunings: int) -> bool:
        """Whether the ``prunings``-th pruning of this run also collects garbage."""
        return bool(self.gc_every) and prunings % self.gc_every == 0
