"""One branch written by every rank of a job: the writer lease (held by rank 0), commits
on a process group of their own, the head all ranks agree on, and pruning."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from cloudckpt import fallback, versions
from cloudckpt.distributed import replicated
from cloudckpt.distributed.collectives import Group
from cloudckpt.distributed.replicated import DistributedOptions
from cloudckpt.errors import CheckpointNotFound
from cloudckpt.lease import WriterLease
from cloudckpt.policies import Policies, prunable
from cloudckpt.repo import Repo
from cloudckpt.versions import Index, Version


class BranchWriter:
    """Writes ``branch`` of ``repo``; with ``exclusive``, rank 0 holds the branch's
    writer lease (waiting out a holder that stopped renewing unless not ``lease_wait``)
    from its first read of the head or its first commit until ``release()``."""

    def __init__(
        self,
        repo: Repo,
        branch: str,
        *,
        exclusive: bool = True,
        lease_ttl: float = 60.0,
        lease_wait: bool = True,
        distributed: DistributedOptions | None = None,
    ) -> None:
        self.repo, self.branch = repo, branch
        self.lease = WriterLease(repo.store, branch, lease_ttl) if exclusive else None
        self.lease_wait = lease_wait
        self.distributed = distributed or DistributedOptions()
        self._group: Group | None = None
        self._commit_group: Group | None = None
        self._prunings = 0

    @property
    def group(self) -> Group:
        """The ranks of the job (one, outside torch.distributed)."""
        if self._group is None:
            timeout = self.distributed.timeout
            self._group = Group.detect(timeout)
            # Commits get a gloo group of their own: an async save's collectives run in a
            # background thread and must never pair with step()'s on the main thread.
            self._commit_group = Group.detect(timeout)
        return self._group

    @property
    def commit_group(self) -> Group:
        """The ranks' group for commits (an async save's thread uses it, never the step's)."""
        self.group  # noqa: B018  (creates both groups on first use)
        assert self._commit_group is not None
        return self._commit_group

    def head(self) -> str | None:
        """The id of the branch's newest version, as rank 0 reads it, on every rank."""
        return replicated.from_rank0(self.group, self._head)

    def head_holding_lease(self) -> str | None:
        """:meth:`head`, read once rank 0 holds the lease (every rank raises if it
        could not take it)."""

        def newest() -> str | None:
            self.hold_lease()
            return self._head()

        return replicated.from_rank0(self.group, newest)

    def _head(self) -> str | None:
        return self.repo.index().branches.get(self.branch)

    def versions(self, index: Index) -> list[Version]:
        """The branch's versions in ``index``, oldest first."""
        return [v for v in index.versions.values() if v.branch == self.branch]

    def check_new_branch(self, index: Index, new_branch: bool) -> None:
        """A branch without versions in a repository that has others is most likely a
        typo: refused (the lease released) unless ``new_branch`` says it is a new one."""
        others = sorted(b for b in index.branches if b != self.branch)
        if new_branch or not others:
            return
        self.release()
        raise CheckpointNotFound(
            f"{self.repo.uri}: branch {self.branch!r} has no versions, but this repository "
            f"has branches {', '.join(others)} -- a typo? Pass new_branch=True to start "
            f"{self.branch!r} from scratch, or fork it first with "
            f"Repo(...).branch({self.branch!r}, {others[0]!r})"
        )

    def load(self, vid: str, into: dict[str, Any]) -> Any:
        """Load version ``vid`` into ``into`` on every rank (see ``distributed``)."""
        return replicated.load(self.repo, vid, self.group, self.distributed, into=into)

    def restore(
        self,
        head_id: str | None,
        index: Index,
        into: dict[str, Any],
        apply: Callable[[Version, Any], None],
        load: Callable[[Version], Any] | None = None,
    ) -> tuple[Version | None, Version | None, dict[str, str]]:
        """Load the newest version of ``head_id``'s lineage that verifies into ``into``
        and ``apply`` it (which raises CorruptCheckpoint if it does not fit): that
        version (twice: loaded, and the bucket's; None if there is no head), and version
        id -> why not for each newer one passed over (logged). ``load``: how a
        candidate's state is loaded into ``into`` (default: from the bucket)."""
        if head_id is None:
            return None, None, {}

        def attempt(candidate: Version) -> None:
            apply(candidate, load(candidate) if load else self.load(candidate.id, into))

        head = self.repo.resolve(head_id, index)
        where = f"{self.repo.uri} branch {self.branch!r}"
        version, _, skipped = fallback.first_good(versions.lineage(index, head.id), attempt, where)
        return version, version, skipped

    def commit(
        self, state: Any, step: int, metrics: dict[str, float], meta: dict[str, Any]
    ) -> Version:
        """Commit ``state`` as the branch's new head, from every rank; rank 0 holds the
        lease and checks it still does right before publishing."""
        rank = self.group.rank  # creates both groups on first use
        assert self._commit_group is not None
        return replicated.commit(
            self.repo,
            state,
            self._commit_group,
            self.distributed,
            branch=self.branch,
            step=step,
            metrics=metrics,
            meta=meta,
            lease=self.lease if rank == 0 else None,
            before_publish=self._check_lease,
        )

    def publish_from_rank0(
        self, publish: Callable[[int | None, Callable[[], None]], Version]
    ) -> Version:
        """``publish(fence, check_lease)`` on rank 0 alone (it commits to the branch, the
        lease's fencing token with it, checking the lease right before publishing); its
        version on every rank, or its error raised on every rank."""
        group = self.group  # creates both groups on first use
        assert self._commit_group is not None

        def on_rank0() -> Version:
            self.hold_lease()
            return publish(self.lease.fence if self.lease is not None else None, self._check_lease)

        if not group.distributed:
            return on_rank0()
        return Version.from_dict(
            self._commit_group.from_rank0(
                lambda: dataclasses.asdict(on_rank0()), context=replicated.SAVE_FAILED
            )
        )

    def prune(self, policies: Policies, resumed_from: str | None) -> None:
        """Drop the versions no retention policy keeps from the index (never the newest,
        ``resumed_from``, or one a branch or tag points to); collect garbage every
        ``policies.gc_every`` prunings."""
        if not policies.retention:
            return
        index = self.repo.index()
        protected = {*index.branches.values(), *index.tags.values()}
        if resumed_from:
            protected.add(resumed_from)
        doomed = prunable(self.versions(index), policies.retention, protected)
        if not doomed:
            return
        fence = self.lease.fence if self.lease is not None else None
        self.repo.delete(doomed, fence=fence, branch=self.branch)
        self._prunings += 1
        if policies.gc_due(self._prunings):
            self.repo.gc(grace=policies.gc_grace)

    def hold_lease(self) -> None:
        if self.lease is not None and self.group.rank == 0 and not self.lease.held:
            self.lease.acquire(wait=self.lease_wait)

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.hold_lease()
            self.lease.check()

    def release(self) -> None:
        """Release the writer lease (if held)."""
        if self.lease is not None:
            self.lease.release()
