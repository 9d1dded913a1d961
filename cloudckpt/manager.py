"""The training-loop API: restore once, call ``step`` every step, and the manager saves,
prunes, rolls back and resumes.

    mgr = CheckpointManager("s3://bucket/runs/gpt", save_every_steps=500, keep_last=3)
    start = mgr.restore(model=model, optimizer=opt, scheduler=sched, sampler=sampler)
    with mgr:                                   # saves the last consistent state on error
        step = start.step
        while step < total_steps:
            loss = train_one_step()
            step = mgr.step(step + 1, metrics={"loss": loss.item()}).step
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from cloudckpt.agreement import StepDecision
from cloudckpt.background import SaveJob, WhenBusy
from cloudckpt.branch_writer import BranchWriter
from cloudckpt.distributed.collectives import Group
from cloudckpt.distributed.replicated import DistributedOptions
from cloudckpt.errors import StoreError
from cloudckpt.gc import DEFAULT_GRACE
from cloudckpt.health import CompletedStep, HealthCheck
from cloudckpt.policies import (
    Mode,
    Policies,
    RetentionPolicy,
    RunHistory,
    SaveFailures,
    SavePoint,
    SavePolicy,
)
from cloudckpt.preemption import PreemptionWatcher, final_save
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.results import Resumed, SaveReport, StepResult
from cloudckpt.resume import META_KEY, RunRecord, registered
from cloudckpt.saving import Saves
from cloudckpt.tiered import TieredSaves
from cloudckpt.tiers.local import LocalTier
from cloudckpt.versions import Version

log = logging.getLogger("cloudckpt")


class CheckpointManager:
    """Saves, prunes and restores a training run's state in the repository at ``uri``.

    Save policies (any of them triggers a save): ``save_every_steps``,
    ``save_every_minutes`` (wall clock from ``clock``), ``best_metric`` (a new best of
    that metric, ``best_mode`` "min" or "max"), plus any ``save_policies`` objects.

    Retention (the union is kept; without any, everything is kept): ``keep_last``,
    ``keep_best`` (by ``best_metric``), ``keep_every`` (steps that are multiples of it),
    plus any ``retention`` objects. The newest version and the one the run resumed from
    are always kept. Pruned versions leave the index at once; their data is garbage
    collected every ``gc_every`` prunings, once older than ``gc_grace`` seconds.
    :meth:`Policies.from_keywords` turns these keywords into policy objects, all held in
    ``policies``; the save policies read the run's saves so far from ``history``.

    ``health`` (a :class:`HealthCheck`, on by default for the metric ``"loss"``) rolls
    back to the last committed version when the loss is non-finite or spikes.

    A branch with no versions in a repository that has other branches is refused by
    ``restore()`` (CheckpointNotFound naming them: most likely a typo) unless
    ``new_branch=True`` says the run starts a new branch.

    ``exclusive`` (default): the manager holds the branch's writer lease (see
    :mod:`cloudckpt.lease`) from ``restore()`` or the first save until ``close()``, so a
    second job on the same branch fails with LeaseHeld naming the first. A holder that
    stopped renewing (its machine was killed) is waited out, at most its ``lease_ttl``,
    then taken over, so a replacement machine resumes; ``lease_wait=False`` fails fast
    instead. Jobs on different branches of one repository do not conflict.

    Inside a ``torchrun`` job (torch.distributed initialized, several ranks) every rank
    makes the same calls: policies are decided on rank 0 and the preemption flag and
    health verdict are agreed across ranks at each ``step()``, so one rank's SIGTERM
    brings every rank to the same final save. The state is taken as replicated (DDP);
    ``distributed`` says how the ranks share writing and reading it. Sharded state
    (FSDP, DTensor) goes through :mod:`cloudckpt.dcp` instead.

    ``local`` (a path or a :class:`LocalTier`): saves land on this host first, bucket
    saves upload from there, ``restore()`` takes the newest complete version of either.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        branch: str = "main",
        save_every_steps: int | None = None,
        save_every_minutes: float | None = None,
        best_metric: str | None = None,
        best_mode: Mode = "min",
        keep_last: int | None = None,
        keep_best: int = 0,
        keep_every: int | None = None,
        save_policies: Sequence[SavePolicy] = (),
        retention: Sequence[RetentionPolicy] = (),
        health: HealthCheck | None = None,
        clock: Callable[[], float] = time.monotonic,
        gc_every: int = 10,
        gc_grace: float = DEFAULT_GRACE,
        async_save: bool = False,
        when_busy: WhenBusy = "wait",
        preemption: PreemptionWatcher | bool | None = None,
        exclusive: bool = True,
        lease_ttl: float = 60.0,
        lease_wait: bool = True,
        new_branch: bool = False,
        save_failures: SaveFailures | None = None,
        distributed: DistributedOptions | None = None,
        options: RepoOptions | None = None,
        local: str | LocalTier | None = None,
    ) -> None:
        self.repo = Repo(uri, storage_options, options=options)
        self.branch, self.clock, self.new_branch = branch, clock, new_branch
        self.policies = Policies.from_keywords(
            save_every_steps=save_every_steps,
            save_every_minutes=save_every_minutes,
            best_metric=best_metric,
            best_mode=best_mode,
            keep_last=keep_last,
            keep_best=keep_best,
            keep_every=keep_every,
            save_policies=save_policies,
            retention=retention,
            gc_every=gc_every,
            gc_grace=gc_grace,
        )
        #: What the save policies know of the run (seeded by ``restore()``).
        self.history = RunHistory(clock())
        self.health = health if health is not None else HealthCheck()
        self.save_failures = save_failures or SaveFailures()
        self.distributed = distributed or DistributedOptions()
        self._writer = BranchWriter(
            self.repo,
            branch,
            exclusive=exclusive,
            lease_ttl=lease_ttl,
            lease_wait=lease_wait,
            distributed=self.distributed,
        )
        #: What went wrong since the last save (fallbacks, rollbacks, failed saves),
        #: recorded in the next save's metadata.
        self._events: list[dict[str, Any]] = []
        tier = LocalTier(local) if isinstance(local, str) else local
        self.tiers = TieredSaves(tier, self._writer) if tier is not None else None
        self._saves = Saves(
            self._writer,
            self.save_failures,
            async_save=async_save,
            when_busy=when_busy,
            clock=clock,
            events=self._events,
            after_commit=lambda: self._prune(),  # looked up per call: tests slow it down
            tiers=self.tiers,
        )
        self._owns_watcher = preemption is True
        self.preemption = PreemptionWatcher().start() if preemption is True else preemption or None
        self.preempted = False
        self.objects: dict[str, Any] = {}
        self.step_count = 0
        self.epoch = 0
        self.extra: Any = None
        self.metrics: dict[str, float] = {}
        self.resumed_from: str | None = None
        self._completed = CompletedStep()

    def __repr__(self) -> str:
        return f"CheckpointManager({self.repo.uri!r}, branch={self.branch!r})"

    @property
    def last_save(self) -> SaveReport | None:
        """What the newest committed save of this run cost."""
        return self._saves.last_save

    @property
    def committed_step(self) -> int | None:
        """The step of the newest version this run saved or resumed from."""
        return self._saves.committed_step

    @property
    def failed_saves(self) -> int:
        """Periodic saves that failed in a row (0 after each successful save)."""
        return self._saves.failures.count

    @property
    def group(self) -> Group:
        """The ranks this manager saves with (one, outside torch.distributed)."""
        return self._writer.group

    # -- restore ---------------------------------------------------------------------
    def restore(self, *, extra: Any = None, **objects: Any) -> Resumed:
        """Register the objects to checkpoint (anything with ``state_dict`` and
        ``load_state_dict``: model, optimizer, scheduler, scaler, sampler...) and load the
        newest version of the branch into them, with the RNG states.

        On a fresh run nothing is loaded and ``extra`` is returned as the extra state.
        If the newest version fails verification, the next older one on the branch is
        tried, and so on; each fallback is logged.
        """
        self.objects = registered(objects)
        self.extra = extra
        head_id = self._writer.head_holding_lease()
        started = self.clock()
        self.history = RunHistory(started)
        index = self.repo.index()
        tiers = self.tiers or self._writer  # the bucket alone without a local tier
        loaded, bucket, skipped = tiers.restore(head_id, index, self.objects, self._apply)
        if loaded is None:
            self._writer.check_new_branch(index, self.new_branch)
            log.info("no checkpoint on %s@%s: fresh run", self.repo.uri, self.branch)
            self._completed.mark(0, self.objects)
            return Resumed(extra=extra)
        self._saves.committed_step = bucket.step if bucket is not None else None
        for vid, error in skipped.items():
            self._events.append({"action": "fallback", "bad_version": vid, "error": error})
        self.resumed_from = bucket.id if bucket is not None else None
        self.history = RunHistory.resumed(self._writer.versions(index), started)
        log.info("resumed %s from %s (step %d)", self.repo.uri, loaded.id, self.step_count)
        return Resumed(
            self.step_count, self.epoch, dict(loaded.metrics), self.extra, loaded, skipped
        )

    def _apply(self, version: Version, state: Any) -> None:
        """Take the step, epoch, extra state and RNG states the version recorded."""
        record = RunRecord.restore(state, version, self.repo.uri)
        self.step_count, self.epoch, self.extra = record.step, record.epoch, record.extra
        self._saves.committed_step = self.step_count
        self._completed.mark(self.step_count, self.objects)

    # -- every step ------------------------------------------------------------------
    def step(
        self,
        step: int | None = None,
        *,
        metrics: Mapping[str, float] | None = None,
        epoch: int | None = None,
        extra: Any = None,
    ) -> StepResult:
        """Report a completed step (default: the previous one + 1) and its metrics.

        Saves if a policy asks for it, or rolls back if the health check fails; the
        returned ``step`` is where training continues (lower after a rollback).
        """
        if not self.objects:
            raise RuntimeError("call restore(model=..., optimizer=...) before step()")
        background = self._saves.background
        if not self.group.distributed:
            self._saves.collect(self.step_count)  # several ranks agree on it below instead
        previous = self.step_count
        self.step_count = self.step_count + 1 if step is None else int(step)
        if epoch is not None:
            self.epoch = int(epoch)
        if extra is not None:
            self.extra = extra
        values = {k: float(v) for k, v in (metrics or {}).items()}
        self.metrics = values
        problem = self.health.problem(values) if self.health else None
        candidate = SavePoint(self.step_count, values, self.clock())
        decision = StepDecision(
            tuple(self.policies.reasons(candidate, self.history)),
            problem,
            self.preemption is not None and self.preemption.triggered,
            background.running,
            background.failed,
        ).agreed(self.group)  # one collective: rank 0's policies, anyone's alarms
        if decision.broken:  # every rank takes the background save's error at this step
            reached, self.step_count = self.step_count, previous
            self._saves.collect(previous, failed_on_a_rank=True)
            self.step_count = reached  # a store failure, survived
        if decision.problem is not None:
            return self._roll_back(decision.problem)
        self._completed.mark(self.step_count, self.objects)
        if decision.preempted and not self.preempted:
            return StepResult(self.step_count, saved=self._final_save(), preempted=True)
        local = self.tiers is not None and self.tiers.tier.due(self.step_count)
        if not decision.reasons and not local:
            return StepResult(self.step_count)
        busy = decision.busy if self.group.distributed else None
        before = background.inflight
        reason, bucket = "; ".join(decision.reasons) or "local tier", bool(decision.reasons)
        try:
            report = self._save(reason, values, None, None, busy, bucket)
        except StoreError as e:
            return StepResult(self.step_count, save_error=self._saves.failed(e, self.step_count))
        started = report is None and background.inflight not in (None, before)
        return StepResult(self.step_count, saved=report, saving=started)

    def save(
        self,
        reason: str = "manual",
        *,
        metrics: Mapping[str, float] | None = None,
        sync: bool | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> SaveReport | None:
        """Save the registered objects now (with the last step's metrics unless
        ``metrics`` is given), then apply retention.

        Synchronous unless the manager was made with ``async_save=True`` (or ``sync`` is
        False): then the state is snapshotted into reused host buffers, the upload and
        commit run in the background, and None is returned (``last_save`` is set when the
        commit lands). At most one save is in flight: a new one waits for it, or is
        skipped when ``when_busy="skip"``. With several ranks this is collective, like
        every save: the ranks agree on whether one is in flight.
        """
        busy = self._saves.agreed_busy(self.step_count)
        return self._save(reason, metrics, sync, meta, busy, True)

    def _save(
        self,
        reason: str,
        metrics: Mapping[str, float] | None,
        sync: bool | None,
        meta: Mapping[str, Any] | None,
        busy: bool | None,
        to_bucket: bool,
    ) -> SaveReport | None:
        """``save`` once the ranks agreed whether a save is in flight on any (``busy``;
        None: one process, ask this one); ``to_bucket`` False: the local tier only."""
        t0 = time.perf_counter()
        if not self._saves.make_room(busy, self.step_count, sync, to_bucket):
            log.info("step %d: a save is still uploading; skipping this one", self.step_count)
            return None
        values = {k: float(v) for k, v in (metrics or self.metrics).items()}
        resources = self.health.before_save(self.repo.uri, to_bucket) if self.health else {}
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state[META_KEY] = RunRecord(self.step_count, self.epoch, self.extra).dump()
        if to_bucket:
            self.history.record(SavePoint(self.step_count, values, self.clock()))
        job = SaveJob(reason, self.step_count, values, {"resources": resources, **(meta or {})}, t0)
        job.to_bucket = to_bucket
        return self._saves.start(state, job, sync)

    def _prune(self) -> None:
        self._writer.prune(self.policies, self.resumed_from)

    def wait(self) -> SaveReport | None:
        """Block until the save in flight (if any) is committed; raise its error."""
        return self._saves.wait()

    def close(self) -> None:
        """Flush the save in flight and stop the preemption watcher."""
        try:
            self._saves.close()
        finally:
            if self.preemption is not None and self._owns_watcher:
                self.preemption.stop()
            self._writer.release()

    # -- preemption ------------------------------------------------------------------
    def _final_save(self) -> SaveReport:
        save = functools.partial(self.save, sync=True)
        report = final_save(self.preemption, self.last_save, self._saves.background.wait, save)
        self.preempted = True
        return report

    # -- health ----------------------------------------------------------------------
    def _roll_back(self, problem: str) -> StepResult:
        self.health.rolling_back(problem)
        # The save in flight lands first, on every rank; then all load what rank 0 finds.
        self._saves.background.wait()
        head = self._writer.head()
        if head is None:
            raise RuntimeError(f"{problem} and no committed version to roll back to")
        target, bad_step = self.repo.resolve(head), self.step_count
        skip = self.health.skip_batches
        objects = {k: v for k, v in self.objects.items() if not (skip and k == "sampler")}
        self._apply(target, self._writer.load(target.id, objects))
        self._events.append(self.health.rolled_back(problem, bad_step, target.id, self.step_count))
        if self.tiers is not None:  # the rolled-back state is the local tier's newest save,
            # so a restart does not resume the lineage abandoned (saved on the same head)
            self._save("rollback", dict(target.metrics), True, None, None, False)
        return StepResult(self.step_count, rolled_back=target)

    # -- save on exception -----------------------------------------------------------
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.close()
            return False
        try:
            self._save_after(exc)
        finally:
            try:
                self.close()
            except Exception as background:  # the loop's own exception matters more
                log.error("closing after %s failed: %s", type(exc).__name__, background)
        return False

    def _save_after(self, exc: BaseException) -> None:
        """Save on exception: only a state that is exactly a completed step's."""
        rank = self.group.rank if self.group.distributed else None
        self._saves.save_after(
            exc,
            lambda: (
                bool(self.objects)
                and self._completed.save_after(
                    exc, self.objects, self.step_count, self.committed_step, rank
                )
            ),
            functools.partial(self.save, sync=True),
        )
