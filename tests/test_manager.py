"""CheckpointManager against a real S3 server (SeaweedFS): policies, retention, restore,
health rollback and save-on-exception."""

from __future__ import annotations

import math

import pytest
import torch
from assertions import assert_state_equal

from cloudckpt import (
    CheckpointManager,
    EveryMinutes,
    HealthCheck,
    KeepBest,
    KeepEvery,
    KeepLast,
    OnBestMetric,
    Repo,
)
from cloudckpt.blobs import blob_key
from cloudckpt.policies import RunHistory, SavePoint


@pytest.fixture
def s3(seaweedfs):
    """(uri, storage_options) of a fresh prefix on the session's SeaweedFS."""
    return seaweedfs.fresh_uri("manager"), seaweedfs.storage_options()


class Trainer:
    """A tiny real model and optimizer; ``train()`` runs one real step."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)

    def train(self) -> float:
        x = torch.randn(16, 8)
        loss = ((self.model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def objects(self) -> dict:
        return {"model": self.model, "optimizer": self.opt}


def quiet() -> HealthCheck:
    return HealthCheck(spike_factor=1e9)


def steps_of(repo: Repo) -> list[int]:
    return [v.step for v in repo.versions()]


def test_every_n_steps(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(uri, opts, save_every_steps=3, health=quiet())
    assert mgr.restore(**t.objects()).fresh
    saved = [mgr.step(s, metrics={"loss": t.train()}).saved is not None for s in range(1, 10)]
    assert saved == [False, False, True, False, False, True, False, False, True]
    assert steps_of(mgr.repo) == [3, 6, 9]
    assert mgr.repo.resolve("main").meta["reason"] == "every 3 steps"


def test_every_minutes_with_an_injected_clock(s3) -> None:
    uri, opts = s3
    now = [1000.0]
    t = Trainer()
    mgr = CheckpointManager(uri, opts, save_every_minutes=5, clock=lambda: now[0], health=quiet())
    mgr.restore(**t.objects())
    for step, minutes in enumerate([1, 2, 4.9, 5.0, 7, 9.9, 10.1], start=1):
        now[0] = 1000.0 + minutes * 60
        mgr.step(step, metrics={"loss": t.train()})
    assert steps_of(mgr.repo) == [4, 7]  # at 5.0 min, then 5 min after that (10.1)


@pytest.mark.parametrize(("mode", "expected"), [("min", [1, 3, 5]), ("max", [1, 2, 4])])
def test_best_metric_min_and_max_and_nan_is_never_best(s3, mode, expected) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(
        uri, opts, best_metric="val", best_mode=mode, health=HealthCheck(metric="loss")
    )
    mgr.restore(**t.objects())
    for step, val in enumerate([5.0, 6.0, 4.0, 7.0, 3.0, math.nan, math.inf, -math.inf], start=1):
        t.train()
        mgr.step(step, metrics={"val": val})
    assert steps_of(mgr.repo) == expected
    assert all(math.isfinite(v.metrics["val"]) for v in mgr.repo.versions())


def test_keep_last_k_prunes_the_index_then_gc_frees_unshared_blobs(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(
        uri, opts, save_every_steps=1, keep_last=2, gc_every=1, gc_grace=0, health=quiet()
    )
    mgr.restore(**t.objects())
    for step in range(1, 6):
        mgr.step(step, metrics={"loss": t.train()})
    repo = mgr.repo
    assert steps_of(repo) == [4, 5]
    live_blobs = {
        blob_key(c[0])
        for v in repo.versions()
        for e in repo.manifest(v.id).tensors
        for c in e["chunks"]
    }
    assert set(repo.store.list_keys("blobs")) == live_blobs
    assert len(repo.store.list_keys("manifests")) == 2
    assert_state_equal(t.model.state_dict(), repo.load()["model"])


def test_keep_best_and_milestones_combine(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(
        uri,
        opts,
        save_every_steps=1,
        retention=[KeepLast(1), KeepBest(2, "val"), KeepEvery(4)],
        health=quiet(),
    )
    mgr.restore(**t.objects())
    vals = [9, 1, 8, 7, 2, 6, 5, 4, 3]
    for step, val in enumerate(vals, start=1):
        t.train()
        mgr.step(step, metrics={"val": float(val)})
    # best two (steps 2 and 5), milestones (4 and 8), newest (9)
    assert steps_of(mgr.repo) == [2, 4, 5, 8, 9]


def test_retention_keeps_the_version_the_run_resumed_from(s3) -> None:
    uri, opts = s3
    first = Trainer()
    mgr = CheckpointManager(uri, opts, save_every_steps=1, health=quiet())
    mgr.restore(**first.objects())
    mgr.step(1, metrics={"loss": first.train()})
    resumed_from = mgr.repo.resolve("main").id

    again = Trainer(seed=1)
    mgr2 = CheckpointManager(uri, opts, save_every_steps=1, keep_last=1, health=quiet())
    start = mgr2.restore(**again.objects())
    assert start.step == 1 and start.version.id == resumed_from
    for step in range(2, 5):
        mgr2.step(step, metrics={"loss": again.train()})
    assert mgr2.repo.versions()[0].id == resumed_from
    assert steps_of(mgr2.repo) == [1, 4]


def test_restore_loads_everything_and_returns_step_epoch_extra(s3) -> None:
    uri, opts = s3
    t = Trainer()
    sched = torch.optim.lr_scheduler.StepLR(t.opt, step_size=2, gamma=0.5)
    mgr = CheckpointManager(uri, opts, health=quiet())
    start = mgr.restore(model=t.model, optimizer=t.opt, scheduler=sched, extra={"tokens": 0})
    assert start.fresh and start.step == 0 and start.extra == {"tokens": 0}
    for _ in range(3):
        t.train()
        sched.step()
    mgr.step(3, epoch=1, metrics={"loss": 0.5}, extra={"tokens": 300})
    mgr.save("test")

    fresh = Trainer(seed=7)
    sched2 = torch.optim.lr_scheduler.StepLR(fresh.opt, step_size=2, gamma=0.5)
    start = CheckpointManager(uri, opts).restore(
        model=fresh.model, optimizer=fresh.opt, scheduler=sched2
    )
    assert (start.step, start.epoch, start.extra) == (3, 1, {"tokens": 300})
    assert start.metrics == {"loss": 0.5}
    assert_state_equal(t.model.state_dict(), fresh.model.state_dict())
    assert_state_equal(t.opt.state_dict(), fresh.opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert fresh.opt.param_groups[0]["lr"] == t.opt.param_groups[0]["lr"]


def test_restore_falls_back_to_the_newest_version_that_verifies(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(uri, opts, save_every_steps=1, health=quiet())
    mgr.restore(**t.objects())
    mgr.step(1, metrics={"loss": t.train()})
    good = {k: v.clone() for k, v in t.model.state_dict().items()}
    mgr.step(2, metrics={"loss": t.train()})
    repo = mgr.repo
    newest = repo.manifest()
    parent_blobs = {c[0] for e in repo.manifest(newest.version.parent).tensors for c in e["chunks"]}
    only_newest = [c[0] for e in newest.tensors for c in e["chunks"] if c[0] not in parent_blobs]
    repo.store.delete([blob_key(only_newest[0])])

    fresh = Trainer(seed=3)
    start = CheckpointManager(uri, opts).restore(**fresh.objects())
    assert start.step == 1
    assert_state_equal(good, fresh.model.state_dict())


def test_exception_between_steps_saves_the_completed_step(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(uri, opts, save_every_steps=100, health=quiet())
    mgr.restore(**t.objects())
    with pytest.raises(KeyError), mgr:
        for step in range(1, 4):
            mgr.step(step, metrics={"loss": t.train()})
        raise KeyError("the data loader failed before step 4 touched the model")
    version = mgr.repo.resolve("main")
    assert version.step == 3 and version.meta["reason"] == "exception: KeyError"
    assert_state_equal(t.model.state_dict(), mgr.repo.load()["model"])


def test_exception_mid_update_never_saves_a_half_updated_state(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(uri, opts, save_every_steps=2, health=quiet())
    mgr.restore(**t.objects())
    with pytest.raises(RuntimeError, match="mid-step"), mgr:
        for step in range(1, 4):
            mgr.step(step, metrics={"loss": t.train()})
        t.train()  # step 4 updated the weights ...
        raise RuntimeError("... then failed mid-step")
    assert steps_of(mgr.repo) == [2]


def test_loss_spike_rolls_back_to_the_last_good_version_and_training_continues(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(
        uri, opts, save_every_steps=5, health=HealthCheck(spike_factor=3.0, warmup=5)
    )
    mgr.restore(**t.objects())
    step = 0
    for _ in range(10):
        step = mgr.step(step + 1, metrics={"loss": t.train()}).step
    good = mgr.repo.resolve("main")
    assert good.step == 10
    weights = {k: v.clone() for k, v in t.model.state_dict().items()}

    with torch.no_grad():  # a bad update: weights blow up, so does the loss
        for p in t.model.parameters():
            p.mul_(100)
    result = mgr.step(step + 1, metrics={"loss": 1e6})
    assert result.rolled_back is not None and result.rolled_back.id == good.id
    assert result.step == 10
    assert_state_equal(weights, t.model.state_dict())

    step = result.step
    for _ in range(5):
        step = mgr.step(step + 1, metrics={"loss": t.train()}).step
    after = mgr.repo.resolve("main")
    assert after.step == 15
    events = after.meta["events"]
    assert events[0]["action"] == "rollback" and events[0]["to_version"] == good.id


def test_nan_loss_is_never_committed(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(
        uri, opts, save_every_steps=1, best_metric="loss", health=HealthCheck(warmup=100)
    )
    mgr.restore(**t.objects())
    mgr.step(1, metrics={"loss": t.train()})
    result = mgr.step(2, metrics={"loss": math.nan})
    assert result.rolled_back is not None and result.step == 1
    assert steps_of(mgr.repo) == [1]


def test_repeated_rollbacks_stop_the_run(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(uri, opts, save_every_steps=1, health=HealthCheck(max_rollbacks=2))
    mgr.restore(**t.objects())
    mgr.step(1, metrics={"loss": t.train()})
    mgr.step(2, metrics={"loss": math.nan})
    mgr.step(2, metrics={"loss": math.nan})
    with pytest.raises(RuntimeError, match="2 rollbacks in a row"):
        mgr.step(2, metrics={"loss": math.nan})


def test_on_best_metric_policy_object_seeds_from_history(s3) -> None:
    uri, opts = s3
    t = Trainer()
    mgr = CheckpointManager(uri, opts, best_metric="val", health=quiet())
    mgr.restore(**t.objects())
    mgr.step(1, metrics={"val": 2.0})
    again = CheckpointManager(uri, opts, best_metric="val", health=quiet())
    again.restore(**Trainer().objects())
    best = next(p for p in again.policies.save if isinstance(p, OnBestMetric))
    assert best.best(again.history) == 2.0
    assert again.step(2, metrics={"val": 3.0}).saved is None
    assert again.step(3, metrics={"val": 1.0}).saved is not None
    assert isinstance(EveryMinutes(1).reason(SavePoint(1, {}, 0.0), RunHistory(0.0)), type(None))
