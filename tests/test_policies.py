"""Save and retention policies: which step saves, what retention keeps, and how the
manager's keywords become policies."""

from __future__ import annotations

import math

import pytest

from cloudckpt.errors import StoreError
from cloudckpt.policies import (
    EveryMinutes,
    EveryNSteps,
    FailedSaves,
    KeepBest,
    KeepEvery,
    KeepLast,
    OnBestMetric,
    Policies,
    RunHistory,
    SaveFailures,
    SavePoint,
    prunable,
)
from cloudckpt.versions import Version


def versions(*metrics: float) -> list[Version]:
    """Versions v1, v2, ... at steps 10, 20, ... with those losses, oldest first."""
    return [
        Version(f"v{i}", "main", step=10 * i, metrics={"loss": m}) for i, m in enumerate(metrics, 1)
    ]


def saving_steps(policy: object, steps: range, history: RunHistory | None = None) -> list[int]:
    """The steps ``policy`` saves at when every save it asks for is made."""
    history = history or RunHistory(0.0)
    saved = []
    for step in steps:
        candidate = SavePoint(step, {}, float(step))
        if policy.reason(candidate, history):  # type: ignore[attr-defined]
            history.record(candidate)
            saved.append(step)
    return saved


def test_every_n_steps_saves_at_the_multiples_of_n() -> None:
    assert saving_steps(EveryNSteps(3), range(1, 11)) == [3, 6, 9]
    with pytest.raises(ValueError):
        EveryNSteps(0)


def test_every_minutes_counts_from_the_start_then_from_each_save() -> None:
    policy, history = EveryMinutes(5), RunHistory(started=100.0)
    assert policy.reason(SavePoint(1, {}, 399.0), history) is None
    assert policy.reason(SavePoint(2, {}, 400.0), history) == "every 5 minutes"
    history.record(SavePoint(2, {}, 450.0))  # a save for any reason restarts the count
    assert policy.reason(SavePoint(3, {}, 700.0), history) is None
    assert policy.reason(SavePoint(4, {}, 750.0), history) is not None


def test_every_minutes_ignores_versions_committed_before_the_resume() -> None:
    history = RunHistory.resumed(versions(1.0, 2.0), now=1000.0)  # no times of this run
    assert history.last_save_time == 1000.0
    assert EveryMinutes(1).reason(SavePoint(21, {}, 1059.0), history) is None
    assert EveryMinutes(1).reason(SavePoint(22, {}, 1060.0), history) is not None


def test_on_best_metric_starts_from_the_best_the_branch_already_has() -> None:
    policy = OnBestMetric("loss")
    history = RunHistory.resumed(versions(3.0, 2.0, 2.5), now=0.0)
    assert policy.best(history) == 2.0
    assert policy.reason(SavePoint(40, {"loss": 2.2}, 1.0), history) is None
    assert policy.reason(SavePoint(41, {"loss": 1.5}, 2.0), history) == "best loss 1.5"
    history.record(SavePoint(41, {"loss": 1.5}, 2.0))
    assert policy.best(history) == 1.5
    assert policy.reason(SavePoint(42, {"loss": 1.7}, 3.0), history) is None


def test_on_best_metric_never_takes_a_non_finite_value_and_honours_max() -> None:
    loss = OnBestMetric("loss")
    history = RunHistory(0.0)
    for bad in (math.nan, math.inf, -math.inf):
        assert loss.reason(SavePoint(1, {"loss": bad}, 0.0), history) is None
    assert loss.reason(SavePoint(1, {"other": 1.0}, 0.0), history) is None
    accuracy = OnBestMetric("acc", mode="max")
    history = RunHistory.resumed([Version("v1", "main", step=1, metrics={"acc": 0.8})], now=0.0)
    assert accuracy.reason(SavePoint(2, {"acc": 0.7}, 0.0), history) is None
    assert accuracy.reason(SavePoint(3, {"acc": 0.9}, 0.0), history) is not None


def test_a_policy_object_keeps_no_state_between_runs() -> None:
    """One policy object serves two histories (two managers) without either leaking."""
    policy = OnBestMetric("loss")
    first, second = RunHistory(0.0), RunHistory(0.0)
    first.record(SavePoint(1, {"loss": 0.1}, 0.0))
    assert policy.reason(SavePoint(1, {"loss": 0.5}, 0.0), second) is not None
    assert policy.reason(SavePoint(2, {"loss": 0.5}, 0.0), first) is None


def test_keep_last_best_and_every() -> None:
    vs = versions(5.0, 1.0, math.nan, 3.0, 2.0, 4.0)  # steps 10..60
    assert KeepLast(2).keep(vs) == {"v5", "v6"}
    assert KeepLast(0).keep(vs) == set()
    assert KeepBest(2, "loss").keep(vs) == {"v2", "v5"}  # nan is never among the best
    assert KeepBest(1, "loss", "max").keep(vs) == {"v1"}
    assert KeepEvery(20).keep(vs) == {"v2", "v4", "v6"}


def test_prunable_always_keeps_the_newest_and_the_protected() -> None:
    vs = versions(1.0, 2.0, 3.0, 4.0)
    assert prunable(vs, [KeepLast(1)], protected={"v1"}) == ["v2", "v3"]
    assert prunable(vs, [KeepLast(1), KeepEvery(20)], protected=()) == ["v1", "v3"]
    assert prunable(vs, [KeepLast(0)], protected=()) == ["v1", "v2", "v3"]
    assert prunable(vs, [], protected=()) == []  # no retention policy: everything is kept
    assert prunable([], [KeepLast(1)], protected=()) == []


def test_the_manager_keywords_build_every_policy_in_one_place() -> None:
    mine = EveryNSteps(7)
    policies = Policies.from_keywords(
        save_every_steps=10,
        save_every_minutes=30,
        best_metric="val",
        best_mode="max",
        keep_last=3,
        keep_best=1,
        keep_every=100,
        save_policies=[mine],
        retention=[KeepLast(9)],
    )
    assert policies.save == (mine, EveryNSteps(10), EveryMinutes(30), OnBestMetric("val", "max"))
    assert policies.retention == (
        KeepLast(9),
        KeepLast(3),
        KeepBest(1, "val", "max"),
        KeepEvery(100),
    )
    assert Policies.from_keywords() == Policies()
    with pytest.raises(ValueError, match="keep_best needs best_metric"):
        Policies.from_keywords(keep_best=1)


def test_reasons_lists_every_policy_that_asks() -> None:
    policies = Policies.from_keywords(save_every_steps=5, best_metric="loss")
    history = RunHistory(0.0)
    assert policies.reasons(SavePoint(10, {"loss": 1.0}, 0.0), history) == [
        "every 5 steps",
        "best loss 1",
    ]
    assert policies.reasons(SavePoint(11, {}, 0.0), history) == []


def test_gc_runs_every_gc_every_prunings_and_never_with_zero() -> None:
    assert [n for n in range(1, 8) if Policies(gc_every=3).gc_due(n)] == [3, 6]
    assert not any(Policies(gc_every=0).gc_due(n) for n in range(1, 8))


def test_failed_saves_are_survived_until_the_policy_gives_up() -> None:
    failures = FailedSaves(SaveFailures(max_consecutive=3, max_minutes=10), now=0.0)
    failures.failed(StoreError("first"), now=10.0)
    failures.failed(StoreError("second"), now=20.0)
    failures.succeeded(now=30.0)  # a success starts the count again
    assert failures.count == 0
    failures.failed(StoreError("a"), now=40.0)
    failures.failed(StoreError("b"), now=50.0)
    with pytest.raises(StoreError, match=r"3 saves in a row failed.*the last: c"):
        failures.failed(StoreError("c"), now=60.0)


def test_failed_saves_give_up_after_max_minutes_without_a_success() -> None:
    failures = FailedSaves(SaveFailures(max_consecutive=100, max_minutes=1), now=0.0)
    failures.failed(StoreError("early"), now=59.0)
    with pytest.raises(StoreError, match=r"none succeeded for 1\.0 min"):
        failures.failed(StoreError("late"), now=60.0)
    with pytest.raises(ValueError):
        SaveFailures(max_consecutive=0)
