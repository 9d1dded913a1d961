"""The health check (what counts as a spike, when rollbacks stop) and the
save-on-exception guard (only a completed step's state is ever saved)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cloudckpt.health import CompletedStep, HealthCheck


def test_a_non_finite_loss_is_unhealthy_at_once() -> None:
    health = HealthCheck()
    assert health.problem({"loss": math.nan}) == "loss is nan"
    assert health.problem({"loss": math.inf}) == "loss is inf"
    assert health.problem({"accuracy": math.nan}) is None  # only the watched metric
    assert health.problem({}) is None


def test_a_spike_counts_only_after_warmup_and_never_joins_the_history() -> None:
    health = HealthCheck(spike_factor=3.0, warmup=3, window=5)
    assert health.problem({"loss": 1.0}) is None
    assert health.problem({"loss": 100.0}) is None  # still warming up: joins the history
    assert health.problem({"loss": 1.0}) is None
    problem = health.problem({"loss": 3.5})  # median of [1, 100, 1] is 1
    assert problem is not None and "spiked to 3.5" in problem
    assert health.problem({"loss": 2.9}) is None  # the spike did not move the median


def test_the_median_follows_the_last_window_values() -> None:
    health = HealthCheck(spike_factor=2.0, warmup=1, window=3)
    for value in (10.0, 10.0, 10.0, 1.0, 1.0, 1.0):  # the 10s leave the window
        assert health.problem({"loss": value}) is None
    assert health.problem({"loss": 2.5}) is not None


def test_rollbacks_stop_after_max_rollbacks_in_a_row_and_a_save_resets_the_count() -> None:
    health = HealthCheck(max_rollbacks=2)
    health.rolling_back("loss is nan")
    health.rolling_back("loss is nan")
    assert health.before_save("mem://r")["free_disk_gb"] > 0
    health.rolling_back("loss is nan")
    health.rolling_back("loss is nan")
    with pytest.raises(RuntimeError, match="loss is nan after 2 rollbacks in a row"):
        health.rolling_back("loss is nan")


def test_a_rollback_event_says_where_from_and_to() -> None:
    event = HealthCheck(skip_batches=False).rolled_back("loss is nan", 12, "v3", 10)
    assert event == {
        "action": "rollback",
        "reason": "loss is nan",
        "at_step": 12,
        "to_version": "v3",
        "to_step": 10,
        "skipped_batches": False,
    }


def test_low_disk_or_memory_is_warned_about() -> None:
    health = HealthCheck(min_free_disk_gb=10.0, min_free_memory_gb=2.0)
    assert health.resource_warnings({"free_disk_gb": 50.0, "free_memory_gb": 4.0}) == []
    warnings = health.resource_warnings({"free_disk_gb": 5.0, "free_memory_gb": 1.0})
    assert warnings == ["low free disk: 5.00 GB", "low free memory: 1.00 GB"]
    report = health.resources()
    assert report["free_disk_gb"] > 0


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # the optimizer has state
    return model, opt


def test_the_guard_sees_any_in_place_write_or_replaced_tensor() -> None:
    model, opt = model_and_optimizer()
    objects = {"model": model, "optimizer": opt}
    completed = CompletedStep()
    completed.mark(1, objects)
    assert completed.unchanged(objects)
    model(torch.randn(3, 4)).sum().backward()  # gradients are not part of the state
    assert completed.unchanged(objects)
    opt.step()  # weights and momentum written in place: a half-updated state
    assert not completed.unchanged(objects)
    completed.mark(2, objects)
    assert completed.unchanged(objects)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert not completed.unchanged(objects)  # copied in place: a write, even of equal values
    completed.mark(3, objects)
    model.weight = nn.Parameter(torch.zeros(2, 4))  # a new tensor
    assert not completed.unchanged(objects)


def test_the_guard_saves_only_a_completed_step_not_yet_committed() -> None:
    model, opt = model_and_optimizer()
    objects = {"model": model, "optimizer": opt}
    completed = CompletedStep()
    completed.mark(5, objects)
    error = KeyboardInterrupt()
    assert completed.save_after(error, objects, step=5, committed=4)
    assert not completed.save_after(error, objects, step=5, committed=5)  # already saved
    assert not completed.save_after(error, objects, step=5, committed=4, rank=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not completed.save_after(error, objects, step=5, committed=4)
