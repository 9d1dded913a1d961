"""Concurrent actors interleaved one store call at a time: the protocol's invariants hold
after every step of every schedule explored (see tests/explorer/ for the explorer and
the invariants I1-I5; benchmarks/schedules.py runs 10,000 random schedules).

The exhaustive explorations are capped so that this file runs in well under a minute;
each failure prints the first schedule that broke an invariant, step by step.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import explorer as s
import pytest
from explorer import Kill, Scenario, committer, gc_actor, lease_holder, repair_actor

from cloudckpt import versions
from cloudckpt.repo import Repo


def _clean(found: s.Exploration | list[s.ScheduleResult]) -> None:
    failures = found.failures if isinstance(found, s.Exploration) else found
    if failures:
        first = failures[0]
        kinds = sorted({v.invariant for r in failures for v in r.violations})
        pytest.fail(
            f"{len(failures)} schedules broke {', '.join(kinds)}; the first:\n"
            f"{first.report()}\nchoices: {' '.join(first.choices)}",
            pytrace=False,
        )


# -- the explorer itself ------------------------------------------------------------------
def _calls(ctx: s.Ctx) -> None:
    store = ctx.repo.store
    store.put("x/a", b"1")
    store.get("x/a")  # calls get_buffer inside: one step
    store.stat("x/a")
    store.list_keys("x")  # calls list_info inside: one step
    store.put_if_absent("x/b", b"2")
    found = store.read_versioned("x/b")
    assert found is not None
    store.put_if_match("x/b", b"3", found[1])
    store.delete(["x/a", "x/b"])


def test_every_public_store_method_is_one_step() -> None:
    result = s.run_schedule(
        Scenario("calls", [s.ActorSpec("a", "calls", _calls)]), s.RandomChooser(0)
    )
    assert [(st.method, st.key) for st in result.steps] == [
        ("start", ""),
        ("put", "x/a"),
        ("get", "x/a"),
        ("stat", "x/a"),
        ("list_keys", "x"),
        ("put_if_absent", "x/b"),
        ("read_versioned", "x/b"),
        ("put_if_match", "x/b"),
        ("delete", "x/a +1"),
    ]
    assert result.violations == []
    known = {
        "get",
        "get_buffer",
        "get_range",
        "stat",
        "put",
        "put_if_absent",
        "read_versioned",
        "put_if_match",
        "list_keys",
        "list_info",
        "delete",
        "abort_stale_uploads",
    }
    assert known <= set(result.wrapped)
    public = {n for n in dir(Repo("memory://x").store) if not n.startswith("_") and n != "fs"}
    methods = {n for n in public if callable(getattr(Repo("memory://x").store, n))}
    assert methods - s.LOCAL_METHODS <= set(result.wrapped)


def test_a_seed_is_one_schedule() -> None:
    for seed in (3, 4):
        a, b = s.run_random(seed), s.run_random(seed)
        assert [(x.actor, x.method) for x in a.steps] == [(x.actor, x.method) for x in b.steps]
        assert a.scenario == b.scenario and len(a.steps) > 10


def test_a_killed_actor_makes_no_store_call_after_the_kill() -> None:
    scenario = Scenario("kill", [committer("a", n=2), committer("b", n=1)], kills=[Kill("a", op=4)])
    result = s.run_schedule(scenario, s.RandomChooser(1))
    assert [st.actor for st in result.steps].count("a") == 4
    assert result.outcomes["a"] == "a#100 killed"
    assert "b#200 acked" in result.outcomes["b"]
    assert result.violations == []


def test_a_frozen_actor_waits_while_the_others_run() -> None:
    scenario = Scenario("freeze", [committer("a", n=1), committer("b", n=1)])
    scenario.freezes.append(s.Freeze("a", step=1, steps=8))
    result = s.run_schedule(scenario, s.ScriptChooser(["a"] * 40))
    assert result.choices[:9] == ["a"] + ["b"] * 8
    assert result.choices[9] == "a"


def test_a_stuck_actor_is_reported_as_a_hang() -> None:
    release = threading.Event()

    def stuck(ctx: s.Ctx) -> None:
        ctx.repo.store.stat("x")
        release.wait(5)  # bounded: ends on its own after the test

    t0 = time.monotonic()
    scenario = Scenario("hang", [s.ActorSpec("a", "stuck", stuck), committer("b", n=1)])
    result = s.run_schedule(scenario, s.ScriptChooser(["a", "a"]), step_timeout=0.3)
    release.set()
    assert {v.invariant for v in result.violations} == {"hang"}
    assert time.monotonic() - t0 < 4


def test_sleep_is_a_step_on_the_virtual_clock() -> None:
    seen: list[float] = []

    def sleeper(ctx: s.Ctx) -> None:
        clock: Any = versions.time  # what cloudckpt modules see while a schedule runs
        before = clock.monotonic()
        clock.sleep(600)
        seen.append(clock.monotonic() - before)

    t0 = time.monotonic()
    scenario = Scenario("sleep", [s.ActorSpec("a", "sleep", sleeper), committer("b", n=1)])
    result = s.run_schedule(scenario, s.RandomChooser(0))
    assert time.monotonic() - t0 < 5 and seen and seen[0] >= 600
    assert "sleep" in [st.method for st in result.steps]
    assert versions.time is time  # restored


def _writer(keys: list[str]) -> s.ActorSpec:
    def run(ctx: s.Ctx) -> None:
        for key in keys:
            ctx.repo.store.put(key, b"x")

    return s.ActorSpec("w" + keys[0], "writer", run)


def test_exhaustive_search_enumerates_every_interleaving() -> None:
    scenario = Scenario("writes", [_writer(["a1", "a2"]), _writer(["b1", "b2"])])
    full = s.explore(scenario, reduce=False, deep_every=0)
    assert full.complete and full.schedules == 20  # (3 + 3)! / (3! 3!): start + 2 puts each
    reduced = s.explore(scenario, deep_every=0)
    # Only the two starts commute (both touch nothing): the 12 schedules that begin with
    # both starts are 6 pairs that differ only in their order.
    assert reduced.complete and reduced.schedules == 14


def _forget_head(ctx: s.Ctx) -> None:
    def drop(ix: versions.Index) -> None:
        row = ix.versions.pop(ix.branches["main"])
        assert row.parent is not None
        ix.branches["main"] = row.parent

    versions.update(ctx.repo.store, drop)


def _add_unknown_row(ctx: s.Ctx) -> None:
    def add(ix: versions.Index) -> None:
        head = ix.versions[ix.branches["main"]]
        ix.versions["unknown"] = dataclasses.replace(head, id="unknown", meta={})

    versions.update(ctx.repo.store, add)


@pytest.mark.parametrize(
    ("actors", "broken"),
    [
        ([s.ActorSpec("x", "forget", _forget_head)], {"I1", "I2"}),
        ([s.ActorSpec("x", "inject", _add_unknown_row)], {"I4"}),
        (
            [lease_holder("h", n=1, pause=5, guard=False), lease_holder("t", n=1, force=True)],
            {"I3"},
        ),
    ],
    ids=["forget-head", "unknown-row", "unfenced-holder"],
)
def test_the_checker_catches_each_kind_of_violation(
    actors: list[s.ActorSpec], broken: set[str]
) -> None:
    result = s.run_schedule(Scenario("bad", actors, setup=2), s.ScriptChooser(["x", "h"]))
    assert {v.invariant for v in result.violations} == broken, result.report()


# -- the protocol -------------------------------------------------------------------------
def test_two_commits_race_on_one_branch() -> None:
    scenario = Scenario("two-commits", [committer("a", n=1), committer("b", n=1)], setup=1)
    _clean(s.explore(scenario, max_schedules=150, time_budget=5, stop_at_first=True))


def test_commit_with_gc_at_grace_zero() -> None:
    scenario = Scenario("commit-gc", [committer("a", n=1), gc_actor("g")], setup=1)
    _clean(s.explore(scenario, max_schedules=150, time_budget=5, stop_at_first=True))


def test_two_gcs_at_once() -> None:
    scenario = Scenario("gc-gc", [gc_actor("g"), gc_actor("h")], setup=2, garbage=1)
    _clean(s.explore(scenario, max_schedules=150, time_budget=5, stop_at_first=True))


def test_repair_while_committing() -> None:
    scenario = Scenario("commit-repair", [committer("a", n=1), repair_actor("r")], setup=1)
    _clean(s.explore(scenario, max_schedules=150, time_budget=5, stop_at_first=True))


def test_forced_lease_takeover_fences_the_old_holder() -> None:
    scenario = Scenario(
        "takeover", [lease_holder("h", n=1), lease_holder("t", n=1, force=True)], setup=1
    )
    _clean(s.explore(scenario, max_schedules=150, time_budget=5, stop_at_first=True))


@pytest.mark.parametrize("backend", ["memory", "file", "gcs", "azurite"])
def test_every_kill_point_of_a_commit_then_repair(
    backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    seeds = range(3)
    if backend in ("gcs", "azurite"):  # a real server: one schedule per kill point
        # The actors open the repository by URI: the server's endpoint from the env.
        server = request.getfixturevalue("fake_gcs" if backend == "gcs" else "azurite")
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        backend, seeds = server.fresh_uri("schedules"), range(1)
    failures = []
    for op in range(1, 12):
        actors = [committer("a", n=1), committer("b", n=1), repair_actor("r")]
        scenario = Scenario(f"kill-a-op{op}", actors, setup=1, kills=[Kill("a", op=op)])
        for seed in seeds:
            result = s.run_schedule(
                scenario, s.RandomChooser(seed), backend=backend, seed=seed, deep_every=1
            )
            failures += [result] if result.violations else []
    _clean(failures)


def test_random_schedules() -> None:
    failures = []
    t0 = time.monotonic()
    for seed in range(400):
        if time.monotonic() - t0 > 10:
            break
        result = s.run_random(seed)
        failures += [result] if result.violations else []
    _clean(failures)
