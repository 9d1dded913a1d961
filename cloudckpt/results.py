"""What the manager returns: where a run resumes, what a step did, what a save cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloudckpt.versions import Version


@dataclass(frozen=True)
class Resumed:
    """Where a run starts: from a version (``version``), or fresh (``version is None``)."""

    step: int = 0
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: Any = None
    version: Version | None = None
    #: Newer versions of the branch that failed verification and were passed over:
    #: version id -> what was wrong (the damaged object is named).
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def fresh(self) -> bool:
        return self.version is None


@dataclass(frozen=True)
class SaveReport:
    """What one save cost."""

    version: Version
    reason: str
    logical_bytes: int
    stored_bytes: int
    uploaded_bytes: int
    seconds: float
    blocked_seconds: float
    #: Where it went: ``"bucket"`` (uploaded from the local tier if there is one) or
    #: ``"local"`` (the local tier only: ``version`` is not in the bucket).
    tier: str = "bucket"


@dataclass(frozen=True)
class StepResult:
    """The step to continue from, and what the manager did at this step: ``saved``
    (a synchronous save), ``saving`` (an async save started), ``rolled_back``, or
    ``preempted`` (a final checkpoint is committed: stop training), or ``save_error``
    (a periodic save failed and training goes on: see :class:`SaveFailures`)."""

    step: int
    saved: SaveReport | None = None
    rolled_back: Version | None = None
    saving: bool = False
    preempted: bool = False
    save_error: str | None = None
