"""Commits held up by garbage collections take a turn, and collections let them go first."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from test_commit import assert_loads, repo_at, state

from cloudckpt import turns, versions
from cloudckpt.errors import FencedOut
from cloudckpt.turns import Turn, after_waiting_commits
from cloudckpt.versions import Index, Sweep

pytestmark = pytest.mark.timeout(300)


def collect_until(root: tuple[str, dict[str, Any]], stop: threading.Event, errors: list) -> None:
    """Collections with grace 0, back to back, until ``stop`` (at most 2 minutes)."""
    collector = repo_at(root)
    deadline = time.monotonic() + 120
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            collector.gc(grace=0)
    except BaseException as e:
        errors.append(e)


def test_commits_get_through_collections_that_never_pause(root) -> None:
    """Three collections sweep back to back, so that one is almost always sweeping: every
    commit is held up, and must still publish (without turns it waited for a gap between
    sweeps that rarely came, and gave up after 16 attempts or an hour)."""
    repo = repo_at(root)
    shared = state(0)["shared"]
    stop, errors = threading.Event(), []
    collectors = [
        threading.Thread(target=collect_until, args=(root, stop, errors)) for _ in range(3)
    ]
    for thread in collectors:
        thread.start()
    acked: dict[str, Any] = {}
    took: list[float] = []
    try:
        time.sleep(0.3)
        for i in range(6):
            value = state(i + 1, shared)
            t0 = time.monotonic()
            acked[repo.commit(value).id] = value
            took.append(time.monotonic() - t0)
    finally:
        stop.set()
        for thread in collectors:
            thread.join(120)
    assert not errors, errors
    assert not any(t.is_alive() for t in collectors)
    assert max(took) < 30, took
    index = repo.index()
    assert not index.waiting and not index.sweeps
    for vid, value in acked.items():
        assert_loads(root, value, vid)


def test_a_collection_waits_for_a_waiting_commit_then_sweeps() -> None:
    repo = repo_at(("memory://turns-wait", {}))
    repo.commit(state(1))
    turn = Turn(repo.store)
    turn.take()
    registered = threading.Event()

    def register(ix: Index) -> None:
        ix.sweeps["gc-test"] = Sweep(0, 60.0)
        registered.set()

    thread = threading.Thread(
        target=after_waiting_commits, args=(repo.store, register, 60.0), daemon=True
    )
    thread.start()
    # ``register`` may run for an attempt that is then refused; what counts is the swap.
    time.sleep(0.5)
    assert "gc-test" not in repo.index().sweeps
    versions.update(repo.store, turn.leave)  # the commit publishes
    turn.close()
    thread.join(10)
    assert not thread.is_alive()
    assert "gc-test" in repo.index().sweeps


def test_a_dead_waiting_commit_holds_collections_back_only_for_its_ttl() -> None:
    """A commit killed (or frozen) while waiting stops renewing its entry: a collection
    drops it once it stood still for its ttl, by the collection's own clock."""
    repo = repo_at(("memory://turns-dead", {}))
    repo.commit(state(1))
    versions.update(repo.store, lambda ix: ix.waiting.update({"commit-dead": Sweep(4, 0.5)}))
    t0 = time.monotonic()
    repo.gc(grace=0)
    assert 0.5 <= time.monotonic() - t0 < 15
    assert not repo.index().waiting


def test_a_waiting_entry_with_a_long_ttl_is_waited_out_for_a_turn_ttl_only(
    monkeypatch,
) -> None:
    """Only another writer can write a ttl above TURN_TTL (up to 300 s passes the schema):
    a collection still waits TURN_TTL at most for an entry that does not move."""
    monkeypatch.setattr(turns, "TURN_TTL", 0.5)
    repo = repo_at(("memory://turns-long-ttl", {}))
    repo.commit(state(1))
    versions.update(repo.store, lambda ix: ix.waiting.update({"commit-x": Sweep(1, 300.0)}))
    t0 = time.monotonic()
    repo.gc(grace=0)
    assert time.monotonic() - t0 < 15
    assert not repo.index().waiting


def test_a_collection_sweeps_anyway_after_its_patience() -> None:
    repo = repo_at(("memory://turns-patience", {}))
    repo.commit(state(1))
    with Turn(repo.store, ttl=3.0) as turn:  # renewed: alive all along
        turn.take()
        t0 = time.monotonic()
        index = after_waiting_commits(
            repo.store, lambda ix: ix.sweeps.update({"gc-test": Sweep(0, 60.0)}), 1.0
        )
        assert 1.0 <= time.monotonic() - t0 < 10
        assert "gc-test" in index.sweeps and turn.token in index.waiting
    assert not repo.index().waiting


def test_a_commit_that_gives_up_leaves_no_turn_behind() -> None:
    """Held up by a collection, then fenced out: its entry is withdrawn, so collections
    are not held back by a commit that will never publish."""
    repo = repo_at(("memory://turns-fenced", {}))
    repo.commit(state(1))
    index = versions.update(repo.store, lambda ix: ix.fences.update({"main": 1}))
    assert index.fences["main"] == 1
    sweeping = versions.update(repo.store, lambda ix: ix.sweeps.update({"gc-test": Sweep(0, 60.0)}))
    assert sweeping.sweeps

    def end_sweep_and_take_the_lease() -> None:
        time.sleep(0.5)

        def change(ix: Index) -> None:
            ix.sweeps.clear()
            ix.fences["main"] = 2

        versions.update(repo.store, change)

    threading.Thread(target=end_sweep_and_take_the_lease, daemon=True).start()
    with pytest.raises(FencedOut):
        repo.commit(state(2), fence=1)
    assert not repo.index().waiting


def test_an_index_with_waiting_commits_round_trips() -> None:
    index = Index(waiting={"commit-a": Sweep(3, 60.0)})
    parsed = Index.parse(index.dumps(), "versions.json")
    assert parsed.waiting == {"commit-a": Sweep(3, 60.0)}
    assert Index.parse(Index().dumps(), "versions.json").waiting == {}


def test_a_turn_dropped_while_its_commit_was_frozen_is_taken_again() -> None:
    repo = repo_at(("memory://turns-retake", {}))
    repo.commit(state(1))
    with Turn(repo.store, ttl=0.3) as turn:
        turn.take()
        assert turn.token in repo.index().waiting
        versions.update(repo.store, lambda ix: ix.waiting.clear())  # dropped as dead
        deadline = time.monotonic() + 5
        while turn.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert turn.lost is not None  # its renewal found it gone and did not re-add it
        assert not repo.index().waiting
        turn.take()
        assert turn.token in repo.index().waiting
    assert not repo.index().waiting
