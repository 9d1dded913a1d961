"""Exploring schedules: exhaustively (depth-first, with sleep sets and a growing
preemption bound) or at random, one schedule per seed."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .actors import ActorSpec, committer, gc_actor, lease_holder, repair_actor, retention_actor
from .model import READ_ONLY, Freeze, Kill, RandomChooser, Violation
from .schedule import Scenario, ScheduleResult, run_schedule


# -- exhaustive exploration ---------------------------------------------------------------
def independent(a: str, b: str) -> bool:
    """Two store calls of different actors commute: both only read."""
    return a in READ_ONLY and b in READ_ONLY


@dataclass
class _Node:
    enabled: list[str]
    ops: dict[str, str]
    sleep: set[str]
    prev: str | None  # the actor that took the step before this one
    preempt: int  # preemptions before this node
    explored: list[str] = field(default_factory=list)
    choice: str = ""

    def cost(self, name: str) -> int:
        """1 if running ``name`` preempts the previous actor, which could go on."""
        return int(self.prev is not None and name != self.prev and self.prev in self.enabled)


class DepthFirst:
    """Stateless depth-first search over schedules with sleep sets and a preemption bound.

    Re-executes from scratch for each schedule, replaying the choices on the stack.
    With ``reduce``, an actor whose pending call commutes with everything explored since
    an alternative to it was taken sleeps (Godefroid's sleep sets), so no two complete
    schedules explored are equivalent up to swapping adjacent reads. With ``bound``,
    only schedules with at most that many preemptions (switching away from an actor that
    could go on) are explored; ``bounded`` tells whether that left any out.
    """

    def __init__(self, reduce: bool = True, bound: int | None = None) -> None:
        self.reduce = reduce
        self.bound = bound
        self.bounded = False
        self.stack: list[_Node] = []
        self.depth = 0
        self.diverged = 0

    def _allowed(self, node: _Node, names: Iterable[str]) -> list[str]:
        fits = [n for n in names if self.bound is None or node.preempt + node.cost(n) <= self.bound]
        self.bounded |= len(fits) < len(list(names))
        return fits

    def choose(self, enabled: Sequence[str], ops: dict[str, str]) -> str | None:
        names = list(enabled)
        if self.depth < len(self.stack):
            node = self.stack[self.depth]
            if node.enabled == names and node.ops == ops:
                self.depth += 1
                return node.choice
            self.diverged += 1  # not deterministic after all: explore from here afresh
            del self.stack[self.depth :]
        sleep: set[str] = set()
        prev, preempt = None, 0
        if self.stack:
            parent = self.stack[-1]
            prev, preempt = parent.choice, parent.preempt + parent.cost(parent.choice)
            if self.reduce:
                taken = parent.ops[parent.choice]
                sleep = {
                    b
                    for b in parent.sleep | set(parent.explored)
                    if b in names
                    and independent(parent.ops[b], taken)
                    and ops.get(b) == parent.ops[b]
                }
        node = _Node(names, dict(ops), sleep, prev, preempt)
        awake = self._allowed(node, [n for n in names if n not in sleep])
        if not awake:
            return None  # every continuation is equivalent to one explored, or over the bound
        node.choice = awake[0]
        self.stack.append(node)
        self.depth += 1
        return node.choice

    def next(self) -> bool:
        """Move to the next unexplored schedule; False when all are explored."""
        self.depth = 0
        while self.stack:
            node = self.stack[-1]
            node.explored.append(node.choice)
            rest = [n for n in node.enabled if n not in node.sleep and n not in node.explored]
            rest = self._allowed(node, rest)
            if rest:
                node.choice = rest[0]
                return True
            self.stack.pop()
        return False


@dataclass
class Exploration:
    """The outcome of exploring a scenario's schedules."""

    scenario: str
    schedules: int = 0
    pruned: int = 0
    steps: int = 0
    complete: bool = False
    diverged: int = 0
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    failures: list[ScheduleResult] = field(default_factory=list)

    @property
    def violations(self) -> list[Violation]:
        return [v for r in self.failures for v in r.violations]

    def summary(self) -> str:
        done = "all" if self.complete else "capped at"
        return (
            f"{self.scenario}: {done} {self.schedules} schedules ({self.pruned} pruned), "
            f"{self.steps} steps, {len(self.failures)} failing, {self.seconds:.1f}s"
        )


def explore(
    scenario: Scenario,
    *,
    backend: str = "memory",
    max_schedules: int = 200,
    time_budget: float = 60.0,
    stop_at_first: bool = False,
    reduce: bool = True,
    deep_every: int = 1,
    preemptions: int | None = 0,
) -> Exploration:
    """Enumerate the schedules of ``scenario`` up to the caps: with ``preemptions`` (a
    start bound), those with at most 0, 1, 2, 4, 8, then any number of preemptions in
    turn (each level re-runs the schedules of the last, uncounted), so that a capped
    run covers the schedules with few context switches (where most races show) before
    the long tails of one schedule; with None, plain depth-first order."""
    if any(k.step is not None for k in scenario.kills) or scenario.freezes:
        reduce = False  # step-numbered injections do not commute with anything
    out = Exploration(scenario.describe())
    t0 = time.monotonic()
    seen: set[tuple[str, ...]] = set()
    bound = preemptions
    while not out.complete:
        search = DepthFirst(reduce, bound)
        while out.schedules < max_schedules and time.monotonic() - t0 < time_budget:
            result = run_schedule(scenario, search, backend=backend, deep_every=deep_every)
            key = tuple(result.choices)
            if key not in seen:  # a lower bound ran it already
                seen.add(key)
                out.schedules += 1
                out.pruned += result.pruned
                out.steps += len(result.steps)
                out.ops.update(result.ops)
                if result.violations:
                    out.failures.append(result)
            if (stop_at_first and out.failures) or not search.next():
                break
        else:
            out.diverged += search.diverged
            break  # a cap
        out.diverged += search.diverged
        if stop_at_first and out.failures:
            break
        out.complete = not search.bounded
        bound = None if bound is None or bound >= 8 else max(1, 2 * bound)
    out.seconds = time.monotonic() - t0
    return out


# -- random schedules ---------------------------------------------------------------------
TEMPLATES: dict[str, Callable[[random.Random], tuple[list[ActorSpec], int]]] = {
    "race": lambda r: ([committer("a"), committer("b")], r.randint(0, 1)),
    "ff-race": lambda r: ([committer("a", fast_forward=True), committer("b")], r.randint(0, 1)),
    "gc": lambda r: ([committer("a"), gc_actor("g")], r.randint(0, 2)),
    "gc2": lambda r: ([committer("a"), gc_actor("g"), gc_actor("h")], r.randint(0, 2)),
    "repair": lambda r: ([committer("a"), committer("b", n=1), repair_actor("r")], r.randint(0, 1)),
    "retention": lambda r: ([committer("a"), retention_actor("d"), gc_actor("g")], 2),
    "lease": lambda r: ([lease_holder("h"), lease_holder("t", n=1, force=True)], r.randint(0, 1)),
    "branches": lambda r: ([committer("a", n=1), committer("b", "dev"), gc_actor("g")], 1),
    "mix": lambda r: (
        [
            committer("a"),
            committer("b", n=1),
            gc_actor("g"),
            repair_actor("r"),
            retention_actor("d", rounds=1),
        ],
        2,
    ),
}


def random_scenario(seed: int) -> tuple[Scenario, str]:
    """The scenario and backend a seed stands for: a template, setup, kills, freezes."""
    rng = random.Random(seed)
    name = rng.choice(sorted(TEMPLATES))
    actors, setup = TEMPLATES[name](rng)
    scenario = Scenario(name, actors, setup)
    if rng.random() < 0.25:
        scenario.kills.append(Kill(rng.choice(actors).name, step=rng.randrange(1, 30)))
    if rng.random() < 0.25:
        who = rng.choice(actors).name
        scenario.freezes.append(Freeze(who, rng.randrange(0, 20), rng.randint(1, 25)))
    backend = "file" if rng.random() < 0.2 else "memory"
    return scenario, backend


def run_random(seed: int, *, deep_every: int = 8, **kwargs: Any) -> ScheduleResult:
    """The schedule seed ``seed`` stands for (scenario, backend and every choice)."""
    scenario, backend = random_scenario(seed)
    chooser = RandomChooser(seed)
    return run_schedule(
        scenario, chooser, backend=backend, seed=seed, deep_every=deep_every, **kwargs
    )


def run_many(seeds: Iterable[int], **kwargs: Any) -> Iterator[ScheduleResult]:
    """Random schedules, one per seed."""
    for seed in seeds:
        yield run_random(seed, **kwargs)
