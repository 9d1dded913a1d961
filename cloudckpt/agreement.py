"""What a step does, agreed by every rank of a job in one collective: save when rank 0's
policies say so, and roll back, stop for preemption or take a background save's error
when any rank has to."""

from __future__ import annotations

from dataclasses import dataclass

from cloudckpt.distributed.collectives import Group


@dataclass(frozen=True)
class StepDecision:
    """One step's verdicts, as this rank sees them or as all ranks agreed."""

    #: Why to save at this step (none: no save).
    reasons: tuple[str, ...] = ()
    #: Why to roll back instead (the health check failed), or None.
    problem: str | None = None
    #: A preemption notice arrived.
    preempted: bool = False
    #: A background save is still running.
    busy: bool = False
    #: The background save that ran failed.
    broken: bool = False

    def agreed(self, group: Group) -> StepDecision:
        """The decision of the whole job: rank 0's save policies, any rank's alarms."""
        if not group.distributed:
            return self
        save, preempted, unhealthy, busy, broken = group.agree(
            [
                float(bool(self.reasons) and group.rank == 0),
                float(self.preempted),
                float(self.problem is not None),
                float(self.busy),
                float(self.broken),
            ]
        )
        reasons = (self.reasons or ("rank 0's save policy",)) if save else ()
        problem = self.problem or ("the health check failed on another rank" if unhealthy else None)
        return StepDecision(reasons, problem, bool(preempted), bool(busy), bool(broken))


@dataclass(frozen=True)
class SaveState:
    """Whether a background save is running (``busy``) or failed (``broken``) on this
    rank, or, agreed, on any."""

    busy: bool = False
    broken: bool = False

    def agreed(self, group: Group) -> SaveState:
        if not group.distributed:
            return self
        busy, broken = group.agree([float(self.busy), float(self.broken)])
        return SaveState(bool(busy), bool(broken))
