"""How a manager's saves land: synchronously, or in the background from a snapshot (one
in flight); committed through the branch writer, then pruned; their cost reported; a
failed periodic save counted and survived until :class:`SaveFailures` gives up."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from cloudckpt.agreement import SaveState
from cloudckpt.background import BackgroundSaver, SaveJob, WhenBusy
from cloudckpt.branch_writer import BranchWriter
from cloudckpt.errors import CloudCkptError, StoreError
from cloudckpt.policies import FailedSaves, SaveFailures
from cloudckpt.results import SaveReport
from cloudckpt.resume import python_rng_untouched
from cloudckpt.tiered import TieredSaves

log = logging.getLogger("cloudckpt")


class Saves:
    """A manager's saves to ``writer``'s branch. ``after_commit`` runs on rank 0 after
    each commit (retention); ``events`` collects what went wrong for the next save's
    metadata."""

    def __init__(
        self,
        writer: BranchWriter,
        failures: SaveFailures,
        *,
        async_save: bool,
        when_busy: WhenBusy,
        clock: Callable[[], float],
        events: list[dict[str, Any]],
        after_commit: Callable[[], None],
        tiers: TieredSaves | None = None,
    ) -> None:
        self.writer, self.async_save, self.clock = writer, async_save, clock
        #: The local tier, if the manager has one: saves land there first.
        self.tiers = tiers
        self.background = BackgroundSaver[SaveReport | None]("cloudckpt-async-save", when_busy)
        self.failures = FailedSaves(failures, clock())
        self.events, self.after_commit = events, after_commit
        self.last_save: SaveReport | None = None
        #: The newest save to the local tier only (None on ranks that do not write it).
        self.last_local_save: SaveReport | None = None
        #: The step of the newest version committed or resumed from.
        self.committed_step: int | None = None
        #: Whether the newest background save is a local-only one.
        self._local_inflight = False

    def agreed_busy(self, step: int) -> bool | None:
        """Whether a save is in flight on any rank (None: one process, ask it later);
        a background save that failed on any rank is taken first, on every rank."""
        group = self.writer.group
        if not group.distributed:
            return None
        agreed = SaveState(self.background.running, self.background.failed).agreed(group)
        if agreed.broken:
            self.collect(step, failed_on_a_rank=True)
        return agreed.busy

    def make_room(
        self, busy: bool | None, step: int, sync: bool | None, to_bucket: bool = True
    ) -> bool:
        """Before a save: False to skip it (one is in flight and ``when_busy="skip"``),
        else wait for the one in flight and True (``busy``: as the ranks agreed). A
        bucket save is never skipped for a local-only save in flight: it waits for it. A
        local-only save (unless ``sync``) never waits: skipped while one is in flight, so
        training does not wait on a background upload for it."""
        if busy is None:
            self.collect(step)
            busy = self.background.running
        if busy and not to_bucket and sync is not True:
            return False
        may_skip = sync is not True and not (to_bucket and self._local_inflight)
        return self.background.make_room(busy, may_skip=may_skip)

    def start(self, state: Any, job: SaveJob, sync: bool | None) -> SaveReport | None:
        """Commit ``state`` now (its report), or from a snapshot in the background (None)
        when ``sync`` is False, or None and the manager saves asynchronously. ``job.meta``
        gains the reason, the mode and the events since the last save."""
        background = not sync if sync is not None else self.async_save
        if self.tiers is not None:
            self.tiers.prepare()
        job.meta = {"reason": job.reason, "mode": "async" if background else "sync", **job.meta}
        if self.events:
            job.meta["events"] = list(self.events)
            self.events.clear()
        if not background:
            return self.commit(state, job)
        snapshot = self.background.snapshot(state)
        job.blocked = time.perf_counter() - job.started
        self.background.submit(self.commit, snapshot, job)
        self._local_inflight = not job.to_bucket
        log.debug("step %d: snapshot in %.3fs, uploading in the background", job.step, job.blocked)
        return None

    def commit(self, state: Any, job: SaveJob) -> SaveReport | None:
        with python_rng_untouched():
            if self.tiers is None:
                version = self.writer.commit(state, job.step, job.metrics, job.meta)
            else:
                landed = self.tiers.commit(state, job)
                if not job.to_bucket:
                    self.last_local_save = job.report(landed) if landed is not None else None
                    return self.last_local_save
                assert landed is not None  # a bucket save: its version on every rank
                version = landed
            if self.writer.group.rank == 0:
                try:
                    self.after_commit()
                except CloudCkptError as e:  # the commit landed; the next pruning catches up
                    log.warning("retention after step %d failed (the save landed): %s", job.step, e)
        self.committed_step = max(self.committed_step or 0, job.step)
        self.failures.succeeded(self.clock())
        self.last_save = job.report(version)
        return self.last_save

    def collect(self, step: int, *, failed_on_a_rank: bool = False) -> None:
        """Collect a background save that ended: a store failure is survived (counted at
        ``step``), any other error raised. ``failed_on_a_rank``: the ranks agreed that
        one failed; its error, agreed by the commit, ends this rank's too."""
        try:
            if failed_on_a_rank:
                self.background.wait()
            else:
                self.background.collect()
        except StoreError as e:
            self.failed(e, step)
            return
        if failed_on_a_rank:
            raise CloudCkptError(
                "a background save failed on another rank; see that rank's error (this "
                "rank's part of it ended without one)"
            )

    def failed(self, error: StoreError, step: int) -> str:
        """Count a failed periodic save and go on, or raise once the run gives up."""
        self.events.append({"action": "save_failed", "at_step": step, "error": str(error)[:500]})
        self.failures.failed(error, self.clock())
        return str(error)

    def wait(self) -> SaveReport | None:
        """Block until the save in flight (if any) is committed; raise its error."""
        self.background.wait()
        return self.last_save

    def close(self) -> None:
        self.background.close()

    def save_after(
        self, exc: BaseException, worth_saving: Callable[[], bool], save: Callable[[str], Any]
    ) -> None:
        """After the training loop raised ``exc``: let the save in flight land, then
        ``save`` if ``worth_saving()`` (a completed step's state, not yet committed);
        errors are logged, the loop's own exception matters more."""
        try:
            self.wait()
        except Exception as background:
            log.error("the save in flight failed too: %s", background)
        if not worth_saving():
            return
        name = type(exc).__name__
        try:
            self.events.append({"action": "save_on_exception", "exception": repr(exc)[:500]})
            save(f"exception: {name}")
        except Exception as save_error:
            log.error("saving after %s failed: %s", name, save_error)
