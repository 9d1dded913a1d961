"""Group.all_reduce on a real gloo group of three processes: a failure on one rank, on
every rank, of different kinds, and inside a nested step, raises the same error on every
rank, of the kind a single process would raise, with each rank's record."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudckpt.distributed import DistributedOptions, Group
from cloudckpt.errors import (
    CloudCkptError,
    CorruptCheckpoint,
    FencedOut,
    LeaseHeld,
    RankFailure,
    RanksFailed,
    StoreError,
)

WORLD = 3


def raises_on(ranks: set[int], rank: int, error: Exception, value: Any = None) -> Any:
    if rank in ranks:
        raise error
    return value


def outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    """What one rank saw: the value, or the error's kind, message and records."""
    try:
        return {"value": fn()}
    except CloudCkptError as e:
        return {
            "is": [
                isinstance(e, k)
                for k in (
                    CorruptCheckpoint,
                    StoreError,
                    LeaseHeld,
                    FencedOut,
                    RanksFailed,
                    KeyError,
                )
            ],
            "message": str(e),
            "failures": {str(r): [f.rank, f.kind, f.message] for r, f in e.failures.items()}
            if isinstance(e, RanksFailed)
            else None,
        }


def scenarios(group: Group) -> dict[str, Any]:
    rank = group.rank
    reduced_on: list[int] = []

    def total(values: list[int]) -> list[Any]:
        reduced_on.append(rank)
        return [sum(values), values]

    found = {
        "sum": outcome(lambda: group.all_reduce(lambda: rank * 10, total)),
        "one_fails": outcome(
            lambda: group.all_reduce(
                lambda: raises_on({1}, rank, StoreError("disk full"), rank),
                total,
                context="save failed: ",
            )
        ),
        "all_fail": outcome(
            lambda: group.all_reduce(
                lambda: raises_on(
                    {rank},
                    rank,
                    [CorruptCheckpoint("bad hash"), KeyError("x"), FencedOut("lease moved")][rank],
                ),
                total,
            )
        ),
        "reduce_fails": outcome(
            lambda: group.all_reduce(lambda: rank, lambda _: raises_on({0}, 0, LeaseHeld("held")))
        ),
        "from_rank0": outcome(lambda: group.from_rank0(lambda: {"head": "v1"})),
        "from_rank0_fails": outcome(
            lambda: group.from_rank0(lambda: raises_on({0}, 0, ValueError("no")))
        ),
        "nested": outcome(
            lambda: group.on_each_rank(
                lambda: group.on_each_rank(
                    lambda: raises_on({2}, rank, CorruptCheckpoint("short read"))
                ),
                context="load failed: ",
            )
        ),
        "each": outcome(lambda: group.on_each_rank(lambda: f"local {rank}")),
    }
    found["reduced_on"] = reduced_on
    return found


def rank_main(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=init,
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        found = scenarios(Group(dist.group.WORLD))
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.json").write_text(json.dumps(found))


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's findings, from one job of three ranks."""
    tmp = tmp_path_factory.mktemp("gloo")
    ctx = multiprocessing.get_context("spawn")
    init = f"file://{tmp / 'rendezvous'}"
    procs = [ctx.Process(target=rank_main, args=(r, init, str(tmp))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD, "a rank hung or crashed"
    return [json.loads((tmp / f"{r}.json").read_text()) for r in range(WORLD)]


def same_on_every_rank(seen: list[dict[str, Any]], name: str) -> dict[str, Any]:
    first = seen[0][name]
    assert all(s[name] == first for s in seen), [s[name] for s in seen]
    return first


#: The order of outcome()'s isinstance checks.
CORRUPT, STORE, LEASE, FENCED, RANKS_FAILED, KEY_ERROR = range(6)


def test_values_are_gathered_in_rank_order_and_reduced_on_rank_0(seen: list[Any]) -> None:
    assert same_on_every_rank(seen, "sum") == {"value": [30, [0, 10, 20]]}
    assert [s["reduced_on"] for s in seen] == [[0], [], []]  # the failed steps never reduced
    assert same_on_every_rank(seen, "from_rank0") == {"value": {"head": "v1"}}
    assert [s["each"] for s in seen] == [{"value": f"local {r}"} for r in range(WORLD)]


def test_one_rank_failing_raises_its_kind_on_every_rank(seen: list[Any]) -> None:
    found = same_on_every_rank(seen, "one_fails")
    assert found["is"][STORE] and found["is"][RANKS_FAILED]
    assert found["message"] == "save failed: rank 1: StoreError: disk full"
    assert found["failures"] == {"1": [1, "StoreError", "StoreError: disk full"]}


def test_every_rank_failing_raises_the_first_kind_with_every_record(seen: list[Any]) -> None:
    found = same_on_every_rank(seen, "all_fail")
    assert found["is"][CORRUPT] and not found["is"][FENCED]
    assert found["message"] == (
        "rank 0: CorruptCheckpoint: bad hash; rank 1: KeyError: 'x'; rank 2: FencedOut: lease moved"
    )
    assert found["failures"] == {
        "0": [0, "CorruptCheckpoint", "CorruptCheckpoint: bad hash"],
        "1": [1, "CloudCkptError", "KeyError: 'x'"],
        "2": [2, "FencedOut", "FencedOut: lease moved"],
    }


def test_a_failed_reduce_or_rank_0_step_reaches_every_rank(seen: list[Any]) -> None:
    found = same_on_every_rank(seen, "reduce_fails")
    assert found["is"][LEASE] and found["message"] == "rank 0: LeaseHeld: held"
    other = same_on_every_rank(seen, "from_rank0_fails")
    # Not a cloudckpt error: it arrives as the base class, not as a ValueError.
    assert other["is"] == [False, False, False, False, True, False]
    assert other["failures"] == {"0": [0, "CloudCkptError", "ValueError: no"]}


def test_a_nested_step_that_failed_everywhere_is_reported_once(seen: list[Any]) -> None:
    found = same_on_every_rank(seen, "nested")
    assert found["is"][CORRUPT]
    assert found["message"] == "load failed: rank 2: CorruptCheckpoint: short read"
    assert list(found["failures"]) == ["2"]


def test_in_one_process_the_calls_are_plain_calls() -> None:
    group = Group()
    assert group.all_reduce(lambda: 4, lambda values: values * 2) == [4, 4]
    with pytest.raises(KeyError):  # the original error, not wrapped
        group.from_rank0(lambda: {}["missing"])
    with pytest.raises(StoreError) as raised:
        group.on_each_rank(lambda: raises_on({0}, 0, StoreError("down")))
    assert not isinstance(raised.value, RanksFailed)


def test_ranks_failed_survives_pickling_with_its_kind() -> None:
    error = RanksFailed.of([RankFailure.of(1, FencedOut("moved"))], "save failed: ")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and isinstance(copy, FencedOut)
    assert str(copy) == "save failed: rank 1: FencedOut: moved"
    assert copy.failures == error.failures


def test_a_checkpoint_group_waits_a_positive_finite_time() -> None:
    assert DistributedOptions().timeout == 1800.0
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            DistributedOptions(timeout=bad)
