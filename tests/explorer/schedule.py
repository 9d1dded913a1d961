"""One schedule: a scenario's actors on a fresh repository, run in the order a chooser
picks, checked after every step."""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from cloudckpt.lease import WriterLease
from cloudckpt.repo import Repo

from .actors import ActorSpec, Ctx
from .checker import Checker
from .clock import real_monotonic, virtual_clock
from .model import (
    OPTIONS,
    Attempt,
    Chooser,
    Freeze,
    Kill,
    Killed,
    Records,
    Step,
    Violation,
    features,
    make_state,
    short,
)
from .scheduler import Scheduler


@dataclass
class Scenario:
    """Actors on one fresh repository, after ``setup`` commits to main, with injections."""

    name: str
    actors: list[ActorSpec]
    setup: int = 0
    #: How many of the oldest setup versions are deleted before the schedule (garbage).
    garbage: int = 0
    kills: list[Kill] = field(default_factory=list)
    freezes: list[Freeze] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"{a.name}={a.kind}" for a in self.actors]
        extra = [str(x) for x in (*self.kills, *self.freezes)]
        setup = f", setup {self.setup}" if self.setup else ""
        setup += f", {self.garbage} deleted" if self.garbage else ""
        return (
            f"{self.name}({' '.join(parts)}{setup}){' [' + ', '.join(extra) + ']' if extra else ''}"
        )


@dataclass
class ScheduleResult:
    """What one schedule did and broke."""

    scenario: str
    backend: str
    seed: int | None
    steps: list[Step]
    violations: list[Violation]
    outcomes: dict[str, str]
    ops: Counter[str]
    seconds: float
    pruned: bool = False
    wrapped: list[str] = field(default_factory=list)

    @property
    def choices(self) -> list[str]:
        return [s.actor for s in self.steps]

    def report(self, limit: int = 200) -> str:
        """The schedule as text: scenario, violations, outcomes and the steps."""
        lines = [f"scenario {self.scenario} on {self.backend}, seed {self.seed}"]
        lines += [f"  VIOLATION {v}" for v in self.violations]
        lines += [f"  {name}: {outcome}" for name, outcome in sorted(self.outcomes.items())]
        shown = self.steps[:limit]
        lines += [f"  {s}" for s in shown]
        if len(self.steps) > limit:
            lines.append(f"  ... {len(self.steps) - limit} more steps")
        return "\n".join(lines)


@contextlib.contextmanager
def fresh_uri(backend: str) -> Iterator[str]:
    """An empty repository root: ``memory://`` (a fresh uuid path), ``file://``, or a
    fresh prefix under ``backend`` when it is a remote root URI (``gs://bucket``,
    ``az://container/prefix``: its endpoint and credentials in the environment)."""
    if backend == "memory":
        uri = f"memory://cloudckpt-schedules/{uuid.uuid4().hex}"
        try:
            yield uri
        finally:
            store = Repo(uri).store
            with contextlib.suppress(FileNotFoundError):
                store.fs.rm(store.root, recursive=True)
    elif backend == "file":
        root = tempfile.mkdtemp(prefix="cloudckpt-schedules-")
        try:
            yield f"file://{root}/repo"
        finally:
            shutil.rmtree(root, ignore_errors=True)
    elif "://" in backend:
        yield f"{backend.rstrip('/')}/{uuid.uuid4().hex}"
    else:
        raise ValueError(f"backend {backend!r}: memory, file or a root URI")


def run_schedule(
    scenario: Scenario,
    chooser: Chooser,
    *,
    backend: str = "memory",
    seed: int | None = None,
    max_steps: int = 2000,
    deep_every: int = 0,
    step_timeout: float = 30.0,
    time_limit: float = 180.0,
) -> ScheduleResult:
    """Run one schedule of ``scenario`` in the order ``chooser`` picks; check after each
    step (loads at every ``deep_every``-th step, 0: only at the end)."""
    t0 = time.monotonic()
    salt = seed if seed is not None else 0
    records = Records()
    run = _Run([], Counter(), False)
    with fresh_uri(backend) as uri:
        _setup(uri, scenario, records, salt)
        checker = Checker(uri, records)
        checker.check(0, deep=False)
        sched = Scheduler(step_timeout, t0 + time_limit)
        leases: list[WriterLease] = []
        wrapped: list[str] = []
        for spec in scenario.actors:
            ops = [k.op for k in scenario.kills if k.actor == spec.name and k.op is not None]
            sched.add(spec.name, ops[0] if ops else None)
        with virtual_clock(sched, salt):
            try:
                feats = features()
                for i, spec in enumerate(scenario.actors):
                    repo = Repo(uri, options=OPTIONS)
                    wrapped = sched.wrap(repo.store, spec.name)
                    ctx = Ctx(spec.name, repo, records, sched, salt, 100 * (i + 1), feats, leases)
                    if not sched.start(spec.name, functools.partial(_body, spec, ctx)):
                        checker.add("hang", 0, spec.name, f"{spec.name} does not start")
                _drive(sched, scenario, chooser, checker, run, max_steps, deep_every)
            finally:
                stuck = sched.abort(join=step_timeout)
                for lease in leases:  # no heartbeat outlives its schedule
                    stop = getattr(lease, "_stop", None)
                    if isinstance(stop, threading.Event):
                        stop.set()
        for name in stuck:
            checker.add("hang", sched.step, f"{name}:stuck", f"{name} did not stop when aborted")
        if not run.pruned:
            checker.check(sched.step, deep=True)
    outcomes = {}
    for spec in scenario.actors:
        mine = [a for a in records.attempts.values() if a.actor == spec.name]
        said = [f"{a.token} {a.status}" + (f" ({a.error[:80]})" if a.error else "") for a in mine]
        said += [records.outcomes[spec.name]] if records.outcomes.get(spec.name) else []
        if not said and sched.actors[spec.name].killed:
            said = ["killed before its first store call"]
        outcomes[spec.name] = "; ".join(said)
    return ScheduleResult(
        scenario.describe(),
        backend,
        seed,
        run.steps,
        checker.violations,
        outcomes,
        run.ops,
        time.monotonic() - t0,
        run.pruned,
        wrapped,
    )


@dataclass
class _Run:
    steps: list[Step]
    ops: Counter[str]
    pruned: bool


def _setup(uri: str, scenario: Scenario, records: Records, salt: int) -> None:
    """Commit the scenario's setup versions (unscheduled) and delete its garbage."""
    setup = Repo(uri, options=OPTIONS)
    for i in range(scenario.setup):
        token = f"setup#{i}"
        state = make_state(-1 - i, salt)
        v = setup.commit(state, step=i, meta={"writer": "setup", "attempt": token})
        records.attempts[token] = Attempt(token, "setup", "main", state, "acked", v.id)
    doomed = [a.vid for a in records.attempts.values() if a.vid][: scenario.garbage]
    if doomed:
        setup.delete(doomed)
        records.deleting.update(dict.fromkeys(doomed, "setup"))


def _drive(
    sched: Scheduler,
    scenario: Scenario,
    chooser: Chooser,
    checker: Checker,
    run: _Run,
    max_steps: int,
    deep_every: int,
) -> None:
    """Grant steps until every actor is done, checking after each; stop at a hang."""
    kills_at = {k.step: k.actor for k in scenario.kills if k.step is not None}
    for _ in range(max_steps + 1):
        step = sched.step
        for f in scenario.freezes:
            if f.step == step and f.actor in sched.actors:
                sched.actors[f.actor].frozen_until = step + f.steps
        if step in kills_at and not sched.kill(kills_at[step]):
            checker.add("hang", step, kills_at[step], f"killed {kills_at[step]} runs on")
            return
        enabled = sched.enabled()
        if not enabled:
            return
        if step >= max_steps or real_monotonic() > sched.deadline:
            running = [a.name for a in enabled]
            checker.add("hang", step, "bound", f"schedule exceeds its bounds: {running} run on")
            return
        pick = chooser.choose(
            [a.name for a in enabled], {a.name: a.waiting[0].method for a in enabled}
        )
        if pick is None:
            run.pruned = True
            return
        request, settled = sched.grant(pick)
        run.steps.append(Step(step, pick, request.method, request.key))
        run.ops[request.method] += 1
        if not settled:
            message = f"{pick} did not finish {request.method} nor reach its next step in time"
            checker.add("hang", step, pick, message)
            return
        deep = deep_every > 0 and sched.step % deep_every == 0
        checker.check(sched.step, deep, writes=sched.writes)


def _body(spec: ActorSpec, ctx: Ctx) -> None:
    try:
        spec.run(ctx)
    except Killed:
        mine = ctx.records.attempts.values()
        if not any(a.actor == spec.name and a.status == "killed" for a in mine):
            ctx.records.outcomes[spec.name] = "killed"
    except Exception as e:  # an actor's own bug, or an API it did not expect
        ctx.fail("error", f"{spec.kind} actor raised {short(e)}")
