"""A deterministic schedule explorer for the commit protocol.

Actors (commits, lease holders, garbage collections, repairs, retention) run in threads,
each with its own :class:`~cloudckpt.Repo` handle on one repository. Every public method
of each handle's :class:`~cloudckpt.store.Store` (found by inspection, so new ones are
covered) is wrapped so that the calling actor blocks until the scheduler grants it one
step; the call then runs to completion and the actor runs on until its next store call.
An actor's start is a step too (what it does before its first call, such as reading the
clock, happens when it is scheduled), and so is waking from ``time.sleep``: inside
cloudckpt, sleeps and ``time.monotonic`` run on a virtual clock that moves only when
every actor left is asleep. One actor runs at a time, so a schedule is a deterministic
sequence of ``(actor, operation, key)`` steps. After every step a checker reads the
repository through an unwrapped handle (the world is paused) and checks:

- **I1** no acknowledged loss: every acknowledged version not deleted by a retention
  actor is in ``versions.json``, its manifest and blobs are stored, and it loads
  bit-exact and verifies (re-checked whenever an object it reads changed);
- **I2** heads move forward: a branch head is the previous head or a descendant of it;
- **I3** fencing: once a lease holder was superseded (another actor's acquire made its
  last write), none of the old holder's commits takes effect afterwards -- a commit takes
  effect at the step after which its version is first in the index; one that took
  effect earlier may return later -- and none of its versions descends from the new
  holder's;
- **I4** repair only restores: every version in the index was acknowledged or committed
  by an actor killed mid-commit; a commit that raised never appears in the index;
- **I5** every garbage collection returns normally (SweepExpired is accepted only from a
  collection that was not scheduled for longer than its sweep may last);
- **hang**: a step, an actor or a schedule that runs past its bound; **error**: any
  other unexpected exception in an actor.

Schedules are enumerated exhaustively (a depth-first search with sleep sets -- two reads
commute, anything else is explored in both orders -- and a growing preemption bound) or
drawn at random from a seed, with optional *kills* (the actor's next store call raises
:class:`Killed`, a BaseException, so nothing of it runs after that) and *freezes* (the
actor is not scheduled for K steps).
"""

from .actors import (
    ActorSpec,
    Ctx,
    committer,
    gc_actor,
    lease_holder,
    repair_actor,
    retention_actor,
)
from .checker import Checker
from .clock import virtual_clock
from .explore import (
    TEMPLATES,
    DepthFirst,
    Exploration,
    explore,
    independent,
    random_scenario,
    run_many,
    run_random,
)
from .model import (
    LOCAL_METHODS,
    OPTIONS,
    READ_ONLY,
    SHARED,
    SLEEP,
    START,
    Acquisition,
    Attempt,
    Chooser,
    Features,
    Freeze,
    Kill,
    Killed,
    RandomChooser,
    Records,
    ScriptChooser,
    Step,
    Violation,
    features,
    make_state,
    rejections,
    same_state,
    store_methods,
)
from .schedule import Scenario, ScheduleResult, fresh_uri, run_schedule
from .scheduler import Scheduler

__all__ = [
    "LOCAL_METHODS",
    "OPTIONS",
    "READ_ONLY",
    "SHARED",
    "SLEEP",
    "START",
    "TEMPLATES",
    "Acquisition",
    "ActorSpec",
    "Attempt",
    "Checker",
    "Chooser",
    "Ctx",
    "DepthFirst",
    "Exploration",
    "Features",
    "Freeze",
    "Kill",
    "Killed",
    "RandomChooser",
    "Records",
    "Scenario",
    "ScheduleResult",
    "Scheduler",
    "ScriptChooser",
    "Step",
    "Violation",
    "committer",
    "explore",
    "features",
    "fresh_uri",
    "gc_actor",
    "independent",
    "lease_holder",
    "make_state",
    "random_scenario",
    "rejections",
    "repair_actor",
    "retention_actor",
    "run_many",
    "run_random",
    "run_schedule",
    "same_state",
    "store_methods",
    "virtual_clock",
]
