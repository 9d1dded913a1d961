"""The actors: commits, lease holders, garbage collections, repairs and retention, each
a body that runs in its own thread on its own (wrapped) repository handle."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudckpt import errors
from cloudckpt.lease import WriterLease
from cloudckpt.repo import Repo

from .model import Acquisition, Attempt, Features, Killed, Records, make_state, rejections, short
from .scheduler import Scheduler


@dataclass
class Ctx:
    """What an actor body gets: its name, its (wrapped) repo, and where to report."""

    name: str
    repo: Repo
    records: Records
    sched: Scheduler
    salt: int
    base: int
    feats: Features
    leases: list[WriterLease]

    def last_write(self) -> int:
        return self.sched.actors[self.name].last_write

    def now(self) -> int:
        return self.sched.step

    def sleep(self, seconds: float) -> None:
        """Sleep on the virtual clock (the others run meanwhile)."""
        self.sched.sleep(self.sched.actors[self.name], seconds)

    def fail(self, invariant: str, message: str) -> None:
        self.records.failures.append((invariant, self.name, message, self.now()))


@dataclass(frozen=True)
class ActorSpec:
    """A named actor: ``run`` is its body, ``kind`` what it is (for reports)."""

    name: str
    kind: str
    run: Callable[[Ctx], None]


_NO_FENCE = object()


def _commit(
    ctx: Ctx,
    branch: str,
    k: int,
    *,
    fence: Any = _NO_FENCE,
    fast_forward: bool = False,
    before: Callable[[], None] | None = None,
) -> bool:
    """Commit state ``k`` and record the outcome; True if acknowledged."""
    token = f"{ctx.name}#{k}"
    state = make_state(k, ctx.salt)
    attempt = ctx.records.attempts[token] = Attempt(token, ctx.name, branch, state)
    kwargs: dict[str, Any] = {"fast_forward": True} if fast_forward else {}
    if fence is not _NO_FENCE:
        kwargs["fence"] = fence
    try:
        if before is not None:
            before()
        version = ctx.repo.commit(
            state, branch=branch, step=k, meta={"writer": ctx.name, "attempt": token}, **kwargs
        )
    except Killed:
        attempt.status = "killed"
        raise
    except rejections() as e:
        attempt.status, attempt.error = "rejected", short(e)
    except Exception as e:
        attempt.status, attempt.error = "error", short(e)
        ctx.fail("error", f"commit {token} raised {short(e)}")
    else:
        attempt.status, attempt.vid = "acked", version.id
    return attempt.status == "acked"


def committer(name: str, branch: str = "main", n: int = 2, fast_forward: bool = False) -> ActorSpec:
    """Commits ``n`` states to ``branch`` (``fast_forward``: on top of a moved head)."""

    def run(ctx: Ctx) -> None:
        for i in range(n):
            _commit(ctx, branch, ctx.base + i, fast_forward=fast_forward)

    return ActorSpec(name, "commit", run)


def lease_holder(
    name: str,
    branch: str = "main",
    n: int = 2,
    force: bool = False,
    pause: float = 0.0,
    guard: bool = True,
) -> ActorSpec:
    """Takes the branch's writer lease (``force``: an operator's takeover), sleeps
    ``pause`` seconds (a slow job), then commits.

    With fencing (``fence=``, ``force=``) each actor is a machine of its own and commits
    carry ``lease.fence``. Without it (the protocol before fencing, as CheckpointManager
    did) each commit is preceded by ``lease.check()``; the actors are managers of one
    process, so a later acquire takes the lease over. ``guard=False`` commits with
    neither: a misbehaving job (the checker's own tests).
    """

    def run(ctx: Ctx) -> None:
        fencing = ctx.feats.fencing
        lease = WriterLease(ctx.repo.store, branch, ttl=3600)
        ctx.leases.append(lease)
        me = getattr(lease, "me", None)
        if fencing and dataclasses.is_dataclass(me) and hasattr(me, "host"):
            lease.me = dataclasses.replace(me, host=f"host-{name}")  # type: ignore[type-var]
        try:
            if fencing and force:
                lease.acquire(force=True)  # type: ignore[call-arg]
            else:
                lease.acquire()
        except Killed:
            raise
        except rejections() as e:
            ctx.records.outcomes[name] = f"lease refused: {short(e)}"
            return
        ctx.records.acquisitions.append(Acquisition(name, branch, ctx.last_write()))
        if pause:
            ctx.sleep(pause)
        for i in range(n):
            if not guard:
                ok = _commit(ctx, branch, ctx.base + i)
            elif fencing:
                ok = _commit(ctx, branch, ctx.base + i, fence=lease.fence)  # type: ignore[attr-defined]
            else:
                ok = _commit(ctx, branch, ctx.base + i, before=lease.check)
            if not ok:
                return  # fenced out or refused: a job stops here

    return ActorSpec(name, "takeover" if force else "lease", run)


def gc_actor(name: str, grace: float = 0.0) -> ActorSpec:
    """``repo.gc(grace)``; any exception breaks I5."""

    def run(ctx: Ctx) -> None:
        began = ctx.sched.vnow
        try:
            report = ctx.repo.gc(grace=grace)
        except Killed:
            raise
        except Exception as e:
            ctx.records.outcomes[name] = f"raised {short(e)}"
            if not _starved(e, ctx.sched.vnow - began):
                ctx.fail("I5", f"gc raised {short(e)}")
        else:
            ctx.records.outcomes[name] = f"swept {len(report.manifests)}m {len(report.blobs)}b"

    return ActorSpec(name, "gc", run)


def _starved(e: Exception, waited: float) -> bool:
    """A collection that stopped because it was not scheduled for longer than its sweep
    may last (SweepExpired): the designed answer to a frozen process, not a failure."""
    import cloudckpt.gc as gc

    expired = getattr(errors, "SweepExpired", None)
    ttl = float(getattr(gc, "SWEEP_TTL", 0.0))
    return expired is not None and isinstance(e, expired) and waited >= ttl * 2 / 3


def repair_actor(name: str) -> ActorSpec:
    """``repo.repair()``."""

    def run(ctx: Ctx) -> None:
        try:
            index = ctx.repo.repair()
            ctx.records.outcomes[name] = f"repaired: {len(index.versions)} versions"
        except Killed:
            raise
        except errors.CommitConflict as e:  # lost races: refused, not wrong
            ctx.records.outcomes[name] = f"refused: {short(e)}"
        except Exception as e:
            ctx.fail("error", f"repair raised {short(e)}")

    return ActorSpec(name, "repair", run)


def retention_actor(name: str, rounds: int = 2) -> ActorSpec:
    """Deletes the oldest version that is neither a branch head nor tagged, ``rounds``
    times (a version it asked to delete is excused from I1)."""

    def run(ctx: Ctx) -> None:
        for _ in range(rounds):
            index = ctx.repo.index()
            pinned = {*index.branches.values(), *index.tags.values()}
            victims = [v for v in index.versions if v not in pinned][:1]
            if not victims:
                continue
            for vid in victims:
                ctx.records.deleting.setdefault(vid, name)
            try:
                ctx.repo.delete(victims)
                ctx.records.outcomes[name] = f"deleted {', '.join(victims)}"
            except Killed:
                raise
            except (errors.CommitConflict, errors.CheckpointNotFound) as e:
                for vid in victims:
                    if ctx.records.deleting.get(vid) == name:
                        del ctx.records.deleting[vid]
                ctx.records.outcomes[name] = f"refused: {short(e)}"
            except Exception as e:
                ctx.fail("error", f"delete raised {short(e)}")

    return ActorSpec(name, "retention", run)
