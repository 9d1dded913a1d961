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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Literal

from cloudckpt import fallback, schema, tree, versions
from cloudckpt.distributed import replicated
from cloudckpt.distributed.collectives import Group
from cloudckpt.distributed.replicated import DistributedOptions
from cloudckpt.errors import CheckpointNotFound, CloudCkptError, CorruptCheckpoint, StoreError
from cloudckpt.gc import DEFAULT_GRACE
from cloudckpt.health import HealthCheck
from cloudckpt.lease import WriterLease
from cloudckpt.policies import (
    EveryMinutes,
    EveryNSteps,
    KeepBest,
    KeepEvery,
    KeepLast,
    Mode,
    OnBestMetric,
    RetentionPolicy,
    SaveFailures,
    SavePolicy,
)
from cloudckpt.preemption import Notice, PreemptionWatcher
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.reports import Resumed, SaveJob, SaveReport, StepResult
from cloudckpt.resume import capture_rng, python_rng_untouched, restore_rng
from cloudckpt.snapshot import Snapshotter
from cloudckpt.versions import Index, Version

log = logging.getLogger("cloudckpt")

#: Key of the manager's own entries in a committed state.
META_KEY = "_cloudckpt"


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
        when_busy: Literal["wait", "skip"] = "wait",
        preemption: PreemptionWatcher | bool | None = None,
        exclusive: bool = True,
        lease_ttl: float = 60.0,
        lease_wait: bool = True,
        new_branch: bool = False,
        save_failures: SaveFailures | None = None,
        distributed: DistributedOptions | None = None,
        options: RepoOptions | None = None,
    ) -> None:
        self.repo = Repo(uri, storage_options, options=options)
        self._lease = WriterLease(self.repo.store, branch, lease_ttl) if exclusive else None
        self.lease_wait, self.new_branch = lease_wait, new_branch
        self.save_failures = save_failures or SaveFailures()
        #: Periodic saves that failed in a row (0 after each successful save).
        self.failed_saves = 0
        self._last_success = clock()
        self.distributed = distributed or DistributedOptions()
        self._group: Group | None = None
        self._commit_group: Group | None = None
        self.branch = branch
        self.clock = clock
        self.health = health if health is not None else HealthCheck()
        self.gc_every, self.gc_grace = gc_every, gc_grace
        self.save_policies: list[SavePolicy] = list(save_policies)
        if save_every_steps:
            self.save_policies.append(EveryNSteps(save_every_steps))
        if save_every_minutes:
            self.save_policies.append(EveryMinutes(save_every_minutes))
        if best_metric:
            self.save_policies.append(OnBestMetric(best_metric, best_mode))
        self.retention: list[RetentionPolicy] = list(retention)
        if keep_last:
            self.retention.append(KeepLast(keep_last))
        if keep_best:
            if not best_metric:
                raise ValueError("keep_best needs best_metric")
            self.retention.append(KeepBest(keep_best, best_metric, best_mode))
        if keep_every:
            self.retention.append(KeepEvery(keep_every))
        self.objects: dict[str, Any] = {}
        self.step_count = 0
        self.epoch = 0
        self.extra: Any = None
        self.metrics: dict[str, float] = {}
        self.last_save: SaveReport | None = None
        self.resumed_from: str | None = None
        self._committed_step: int | None = None
        self._versions_at_step: dict[str, tuple[int, int]] = {}
        self._completed = 0
        self._events: list[dict[str, Any]] = []
        self._rollbacks = 0
        self._prunings = 0
        self.async_save, self.when_busy = async_save, when_busy
        self._snapshots = Snapshotter()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: Future[SaveReport] | None = None
        self._owns_watcher = preemption is True
        self.preemption = PreemptionWatcher().start() if preemption is True else preemption or None
        self.preempted = False

    def __repr__(self) -> str:
        return f"CheckpointManager({self.repo.uri!r}, branch={self.branch!r})"

    @property
    def committed_step(self) -> int | None:
        """The step of the newest version this run saved or resumed from."""
        return self._committed_step

    # -- restore ---------------------------------------------------------------------
    def restore(self, *, extra: Any = None, **objects: Any) -> Resumed:
        """Register the objects to checkpoint (anything with ``state_dict`` and
        ``load_state_dict``: model, optimizer, scheduler, scaler, sampler...) and load the
        newest version of the branch into them, with the RNG states.

        On a fresh run nothing is loaded and ``extra`` is returned as the extra state.
        If the newest version fails verification, the next older one on the branch is
        tried, and so on; each fallback is logged.
        """
        for name, obj in objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"{name}: {type(obj).__name__} has no state_dict/load_state_dict")
        if META_KEY in objects:
            raise ValueError(f"{META_KEY!r} is reserved")
        self.objects = dict(objects)
        self.extra = extra

        def newest() -> str | None:  # rank 0 takes the lease, then reads the head
            self._hold_lease()
            return self._head()

        # Every rank resumes from the version rank 0 found once it held the lease, and
        # every rank raises if rank 0 could not take it.
        head_id = replicated.from_rank0(self.group, newest)
        for policy in self.save_policies:
            policy.start(self.step_count, self.clock())
        index = self.repo.index()
        if head_id is None:
            self._check_new_branch(index)
            log.info("no checkpoint on %s@%s: fresh run", self.repo.uri, self.branch)
            self._mark_completed(0)
            return Resumed(extra=extra)
        head = self.repo.resolve(head_id, index)
        skipped: dict[str, str] = {}
        version = self._load_newest_good(head, index, skipped)
        self.resumed_from = version.id
        for policy in self.save_policies:
            if isinstance(policy, OnBestMetric):
                policy.seed(self._branch_versions(index))
        log.info("resumed %s from %s (step %d)", self.repo.uri, version.id, self.step_count)
        return Resumed(
            self.step_count, self.epoch, dict(version.metrics), self.extra, version, skipped
        )

    def _check_new_branch(self, index: Index) -> None:
        """A branch without versions in a repository that has others is most likely a
        typo: refused unless the run said it starts a new branch."""
        others = sorted(b for b in index.branches if b != self.branch)
        if self.new_branch or not others:
            return
        if self._lease is not None:
            self._lease.release()
        raise CheckpointNotFound(
            f"{self.repo.uri}: branch {self.branch!r} has no versions, but this repository "
            f"has branches {', '.join(others)} -- a typo? Pass new_branch=True to start "
            f"{self.branch!r} from scratch, or fork it first with "
            f"Repo(...).branch({self.branch!r}, {others[0]!r})"
        )

    def _load_newest_good(self, head: Version, index: Index, skipped: dict[str, str]) -> Version:
        """Load the newest version of ``head``'s lineage that verifies and fits the
        registered objects (``skipped``: version id -> why not)."""

        def attempt(candidate: Version) -> None:
            self._apply(candidate, self._load(candidate.id, self.objects))

        version, _, bad = fallback.first_good(
            versions.lineage(index, head.id), attempt, f"{self.repo.uri} branch {self.branch!r}"
        )
        skipped.update(bad)
        for vid, error in bad.items():
            self._events.append({"action": "fallback", "bad_version": vid, "error": error})
        return version

    def _load(self, vid: str, into: dict[str, Any]) -> Any:
        return replicated.load(self.repo, vid, self.group, self.distributed, into=into)

    @property
    def group(self) -> Group:
        """The ranks this manager saves with (one, outside torch.distributed)."""
        if self._group is None:
            self._group = Group.detect()
            # Commits get a gloo group of their own: an async save's collectives run in a
            # background thread and must never pair with step()'s on the main thread.
            self._commit_group = Group.detect()
        return self._group

    def _apply(self, version: Version, state: Any) -> None:
        """Take the step, epoch, extra state and RNG states the version recorded."""
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
                f"{self.repo.uri} version {version.id}: its step, epoch or RNG record is "
                f"malformed ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        self.step_count, self.epoch = step, epoch
        self.extra = own.get("extra")
        self._committed_step = self.step_count
        self._mark_completed(self.step_count)

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
        if not self.group.distributed:
            self._raise_background_error()  # several ranks agree on it below instead
        previous = self.step_count
        self.step_count = self.step_count + 1 if step is None else int(step)
        if epoch is not None:
            self.epoch = int(epoch)
        if extra is not None:
            self.extra = extra
        values = {k: float(v) for k, v in (metrics or {}).items()}
        self.metrics = values
        problem = self.health.problem(values) if self.health else None
        preempted = self.preemption is not None and self.preemption.triggered
        now = self.clock()
        reasons = [r for p in self.save_policies if (r := p.reason(self.step_count, values, now))]
        busy: bool | None = None
        if self.group.distributed:  # one collective: rank 0's policies, anyone's alarms
            running, broken = self._inflight_state()
            save, preempted_any, failed_any, busy_any, broken_any = self.group.agree(
                [
                    float(bool(reasons) and self.group.rank == 0),
                    float(preempted),
                    float(problem is not None),
                    float(running),
                    float(broken),
                ]
            )
            if broken_any:  # every rank takes the background save's error at this step
                reached, self.step_count = self.step_count, previous
                self._raise_agreed_background_error()
                self.step_count = reached  # a store failure, survived
            busy = bool(busy_any)
            reasons = (reasons or ["rank 0's save policy"]) if save else []
            problem = problem or ("the health check failed on another rank" if failed_any else None)
            preempted = bool(preempted_any)
        if problem is not None:
            return self._roll_back(problem)
        self._mark_completed(self.step_count)
        if preempted and not self.preempted:
            return StepResult(self.step_count, saved=self._final_save(), preempted=True)
        if not reasons:
            return StepResult(self.step_count)
        inflight = self._inflight
        try:
            report = self._save("; ".join(reasons), values, None, None, busy)
        except StoreError as e:
            return StepResult(self.step_count, save_error=self._save_failed(e))
        started = report is None and self._inflight is not None and self._inflight is not inflight
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
        busy = None
        if self.group.distributed:
            running, broken = self._inflight_state()
            busy_any, broken_any = self.group.agree([float(running), float(broken)])
            if broken_any:
                self._raise_agreed_background_error()
            busy = bool(busy_any)
        return self._save(reason, metrics, sync, meta, busy)

    def _save(
        self,
        reason: str,
        metrics: Mapping[str, float] | None,
        sync: bool | None,
        meta: Mapping[str, Any] | None,
        busy: bool | None,
    ) -> SaveReport | None:
        """``save`` once the ranks agreed whether a save is in flight on any (``busy``;
        None: one process, ask this one)."""
        if busy is None:
            self._raise_background_error()
            busy = self._inflight is not None and not self._inflight.done()
        values = {k: float(v) for k, v in (metrics or self.metrics).items()}
        t0 = time.perf_counter()
        if busy:
            if self.when_busy == "skip" and sync is not True:
                log.info("step %d: a save is still uploading; skipping this one", self.step_count)
                return None
            self._wait_inflight()
        resources = self.health.resources() if self.health else {}
        for warning in self.health.resource_warnings(resources) if self.health else []:
            log.warning("%s: %s", self.repo.uri, warning)
        state = {name: obj.state_dict() for name, obj in self.objects.items()}
        state[META_KEY] = {
            "rng": capture_rng(),
            "step": self.step_count,
            "epoch": self.epoch,
            "extra": self.extra,
        }
        background = not sync if sync is not None else self.async_save
        info = {
            "reason": reason,
            "mode": "async" if background else "sync",
            "resources": resources,
            **(meta or {}),
        }
        if self._events:
            info["events"] = self._events
            self._events = []
        self._rollbacks = 0
        now = self.clock()
        for policy in self.save_policies:
            policy.saved(self.step_count, values, now)
        job = SaveJob(reason, self.step_count, values, info, t0)
        if not background:
            return self._commit(state, job)
        state = self._snapshots.copy(state)
        job.blocked = time.perf_counter() - t0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-async-save")
        self._inflight = self._pool.submit(self._commit, state, job)
        log.debug("step %d: snapshot in %.3fs, uploading in the background", job.step, job.blocked)
        return None

    def _hold_lease(self) -> None:
        if self._lease is not None and self.group.rank == 0 and not self._lease.held:
            self._lease.acquire(wait=self.lease_wait)

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._hold_lease()
            self._lease.check()

    def _commit(self, state: Any, job: SaveJob) -> SaveReport:
        with python_rng_untouched():
            rank = self.group.rank  # creates both groups on first use
            assert self._commit_group is not None
            version = replicated.commit(
                self.repo,
                state,
                self._commit_group,
                self.distributed,
                branch=self.branch,
                step=job.step,
                metrics=job.metrics,
                meta=job.meta,
                lease=self._lease if rank == 0 else None,
                before_publish=self._check_lease,
            )
            if self.group.rank == 0:
                try:
                    self._prune()
                except CloudCkptError as e:  # the commit landed; the next pruning catches up
                    log.warning("retention after step %d failed (the save landed): %s", job.step, e)
        seconds = time.perf_counter() - job.started
        blocked = seconds if job.blocked is None else job.blocked
        self._committed_step = max(self._committed_step or 0, job.step)
        self.failed_saves, self._last_success = 0, self.clock()
        self.last_save = SaveReport(
            version,
            job.reason,
            version.logical_bytes,
            version.stored_bytes,
            version.uploaded_bytes,
            seconds,
            blocked,
        )
        log.info(
            "saved step %d (%s) as %s: %.1f MB logical, %.1f MB stored, %.1f MB uploaded, "
            "%.2fs, training blocked %.2fs",
            job.step,
            job.reason,
            version.id,
            version.logical_bytes / 1e6,
            version.stored_bytes / 1e6,
            version.uploaded_bytes / 1e6,
            seconds,
            blocked,
        )
        return self.last_save

    def wait(self) -> SaveReport | None:
        """Block until the save in flight (if any) is committed; raise its error."""
        self._wait_inflight()
        return self.last_save

    def _wait_inflight(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.result()

    def _raise_background_error(self) -> None:
        """Collect a background save that ended: a store failure is survived (see
        :class:`SaveFailures`), any other error raised."""
        if self._inflight is not None and self._inflight.done():
            try:
                self._wait_inflight()
            except StoreError as e:
                self._save_failed(e)

    def _save_failed(self, error: StoreError) -> str:
        """Count a failed periodic save and go on, or raise once the run gives up."""
        self.failed_saves += 1
        down = self.clock() - self._last_success
        self._events.append(
            {"action": "save_failed", "at_step": self.step_count, "error": str(error)[:500]}
        )
        policy = self.save_failures
        if policy.gives_up(self.failed_saves, down):
            raise StoreError(
                f"{self.failed_saves} saves in a row failed and none succeeded for "
                f"{down / 60:.1f} min (giving up by {policy}); the last: {error}"
            ) from error
        log.error(
            "a save failed (%d in a row; training goes on and the next save point tries "
            "again; the run stops after %d in a row or %.0f min without a save): %s",
            self.failed_saves,
            policy.max_consecutive,
            policy.max_minutes,
            error,
        )
        return str(error)

    def _inflight_state(self) -> tuple[bool, bool]:
        """(a save is still running here, the one that ran here failed)."""
        fut = self._inflight
        running = fut is not None and not fut.done()
        return running, fut is not None and fut.done() and fut.exception() is not None

    def _raise_agreed_background_error(self) -> None:
        """A background save failed on some rank: its error, agreed by the commit, ends
        this rank's save too; survived like a local one if it is a store failure."""
        try:
            self._wait_inflight()
        except StoreError as e:
            self._save_failed(e)
            return
        raise CloudCkptError(
            "a background save failed on another rank; see that rank's error (this rank's "
            "part of it ended without one)"
        )

    def close(self) -> None:
        """Flush the save in flight and stop the preemption watcher."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self.preemption is not None and self._owns_watcher:
                self.preemption.stop()
            if self._lease is not None:
                self._lease.release()

    # -- preemption ------------------------------------------------------------------
    def _final_save(self) -> SaveReport:
        watcher = self.preemption
        notice = watcher.notice if watcher is not None else None
        if notice is None:  # the signal reached another rank
            notice = Notice("another rank", time.monotonic() + 30.0)
        left = notice.deadline - time.monotonic()
        estimate = self.last_save.seconds if self.last_save else None
        if estimate is not None and estimate > left:
            log.warning(
                "preemption (%s): a full save took %.1fs last time but only %.1fs are left; "
                "committing the snapshot already uploading first, then trying the final save",
                notice.source,
                estimate,
                left,
            )
        t0 = time.perf_counter()
        self._wait_inflight()
        waited = time.perf_counter() - t0
        report = self.save(
            f"preemption ({notice.source})",
            sync=True,
            meta={
                "preemption": {
                    "source": notice.source,
                    "seconds_left": round(left, 3),
                    "waited_for_inflight_seconds": round(waited, 3),
                }
            },
        )
        assert report is not None
        self.preempted = True
        log.warning(
            "preemption (%s): final checkpoint %s at step %d committed in %.2fs; stop training",
            notice.source,
            report.version.id,
            report.version.step,
            waited + report.seconds,
        )
        return report

    # -- retention -------------------------------------------------------------------
    def _branch_versions(self, index: Index) -> list[Version]:
        return [v for v in index.versions.values() if v.branch == self.branch]

    def _prune(self) -> None:
        if not self.retention:
            return
        index = self.repo.index()
        ours = self._branch_versions(index)
        if not ours:
            return
        keep = {ours[-1].id, *([self.resumed_from] if self.resumed_from else [])}
        for policy in self.retention:
            keep |= policy.keep(ours)
        pinned = {*index.branches.values(), *index.tags.values()}
        doomed = [v.id for v in ours if v.id not in keep and v.id not in pinned]
        if not doomed:
            return
        fence = self._lease.fence if self._lease is not None else None
        self.repo.delete(doomed, fence=fence, branch=self.branch)
        self._prunings += 1
        if self.gc_every and self._prunings % self.gc_every == 0:
            self.repo.gc(grace=self.gc_grace)

    # -- health ----------------------------------------------------------------------
    def _roll_back(self, problem: str) -> StepResult:
        self._rollbacks += 1
        if self._rollbacks > self.health.max_rollbacks:
            raise RuntimeError(
                f"{problem} after {self.health.max_rollbacks} rollbacks in a row; stopping "
                "(lower the learning rate or inspect the data)"
            )
        # The save in flight lands first, on every rank; then all load what rank 0 finds.
        self._wait_inflight()
        head = replicated.from_rank0(self.group, self._head)
        if head is None:
            raise RuntimeError(f"{problem} and no committed version to roll back to")
        target = self.repo.resolve(head)
        bad_step = self.step_count
        objects = dict(self.objects)
        if self.health.skip_batches:
            objects.pop("sampler", None)
        state = self._load(target.id, objects)
        self._apply(target, state)
        event = {
            "action": "rollback",
            "reason": problem,
            "at_step": bad_step,
            "to_version": target.id,
            "to_step": self.step_count,
            "skipped_batches": self.health.skip_batches,
        }
        self._events.append(event)
        skipping = ", skipping the offending batches" if self.health.skip_batches else ""
        log.warning(
            "%s at step %d: rolled back to %s (step %d)%s",
            problem,
            bad_step,
            target.id,
            self.step_count,
            skipping,
        )
        return StepResult(self.step_count, rolled_back=target)

    def _head(self) -> str | None:
        return self.repo.index().branches.get(self.branch)

    # -- save on exception -----------------------------------------------------------
    def _tracked_versions(self) -> dict[str, tuple[int, int]]:
        # Every in-place write bumps a tensor's version counter (shared with the
        # detached views state_dict() returns), so equal counters mean an unchanged state.
        out = {}
        for name, obj in self.objects.items():
            for path, t in tree.tensors_by_path(obj.state_dict(), name).items():
                out[path] = (t.data_ptr(), t._version)
        return out

    def _mark_completed(self, step: int) -> None:
        self._versions_at_step = self._tracked_versions() if self.objects else {}
        self._completed = step

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
        try:
            self.wait()
        except Exception as background:
            log.error("the save in flight failed too: %s", background)
        if not self.objects:
            return
        if self.group.distributed:
            log.error(
                "%s raised on rank %d; not saving (the other ranks may never reach a "
                "collective save). The last committed step is %s.",
                type(exc).__name__,
                self.group.rank,
                self._committed_step,
            )
            return
        if self._tracked_versions() != self._versions_at_step:
            log.error(
                "%s raised mid-step (the state changed after step %d completed); not saving a "
                "half-updated state. The last committed step is %s.",
                type(exc).__name__,
                self._completed,
                self._committed_step,
            )
            return
        if self._committed_step == self.step_count:
            log.info("%s raised; step %d is already committed", type(exc).__name__, self.step_count)
            return
        try:
            self._events.append({"action": "save_on_exception", "exception": repr(exc)[:500]})
            self.save(f"exception: {type(exc).__name__}", sync=True)
        except Exception as save_error:
            log.error("saving after %s failed: %s", type(exc).__name__, save_error)
