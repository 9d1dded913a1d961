"""Async saves: the loop blocks only for the snapshot; errors surface; one in flight."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from assertions import assert_state_equal
from processes import reaped, sigkill_when

from cloudckpt import CheckpointManager, HealthCheck, Repo, SaveFailures
from cloudckpt.errors import StoreError

CHILD = str(Path(__file__).with_name("child_async.py"))


def trainer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    return model, torch.optim.AdamW(model.parameters())


def train(model, opt) -> float:
    loss = model(torch.randn(16, 64)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_async_save_commits_the_snapshot_not_later_updates(tmp_path) -> None:
    model, opt = trainer()
    mgr = CheckpointManager(
        f"file://{tmp_path}/r",
        save_every_steps=2,
        async_save=True,
        health=HealthCheck(spike_factor=1e9),
    )
    mgr.restore(model=model, optimizer=opt)
    train(model, opt)
    mgr.step(1)
    train(model, opt)
    at_step_2 = {k: v.clone() for k, v in model.state_dict().items()}
    result = mgr.step(2)
    assert result.saving and result.saved is None
    for _ in range(3):  # keep training while the upload runs
        train(model, opt)
    report = mgr.wait()
    assert report is not None and report.version.step == 2
    assert report.blocked_seconds <= report.seconds
    assert report.version.meta["mode"] == "async"
    assert_state_equal(at_step_2, Repo(f"file://{tmp_path}/r").load()["model"])


def test_a_background_failure_is_counted_then_raised_by_the_policy(tmp_path) -> None:
    """A store failure of a background save surfaces at the next call: survived (and
    counted) until SaveFailures gives up, then raised with the store's error."""
    model, opt = trainer()
    mgr = CheckpointManager(
        f"file://{tmp_path}/r",
        save_every_steps=1,
        async_save=True,
        health=HealthCheck(spike_factor=1e9),
        save_failures=SaveFailures(max_consecutive=2),
    )
    mgr.restore(model=model, optimizer=opt)

    def broken_put(key, data):
        raise StoreError(f"put {key} failed: injected")

    def settle() -> None:
        deadline = time.monotonic() + 30
        while not mgr._saves.background.inflight.done() and time.monotonic() < deadline:
            time.sleep(0.01)

    mgr.repo.store.put = broken_put  # type: ignore[method-assign]
    train(model, opt)
    assert mgr.step(1).saving
    settle()
    assert mgr.step(2).saving and mgr.failed_saves == 1  # survived; the next save started
    settle()
    with pytest.raises(StoreError, match=r"2 saves in a row failed.*injected"):
        mgr.step(3)


def test_when_busy_skip_skips_while_a_save_is_uploading(tmp_path) -> None:
    model, opt = trainer()
    mgr = CheckpointManager(
        f"file://{tmp_path}/r",
        save_every_steps=1,
        async_save=True,
        when_busy="skip",
        health=HealthCheck(spike_factor=1e9),
    )
    mgr.restore(model=model, optimizer=opt)
    original = mgr.repo.commit

    def slow_commit(*args, **kwargs):
        time.sleep(0.5)
        return original(*args, **kwargs)

    mgr.repo.commit = slow_commit  # type: ignore[method-assign]
    assert mgr.step(1).saving
    assert not mgr.step(2).saving  # skipped: step 1 is still uploading
    mgr.wait()
    assert [v.step for v in mgr.repo.versions()] == [1]


def test_context_exit_flushes_the_save_in_flight(tmp_path) -> None:
    model, opt = trainer()
    with CheckpointManager(
        f"file://{tmp_path}/r",
        save_every_steps=1,
        async_save=True,
        health=HealthCheck(spike_factor=1e9),
    ) as mgr:
        mgr.restore(model=model, optimizer=opt)
        train(model, opt)
        mgr.step(1)
    assert Repo(f"file://{tmp_path}/r").resolve("main").step == 1


def test_sigkill_during_an_async_upload_leaves_no_torn_version(seaweedfs) -> None:
    uri = seaweedfs.fresh_uri("async")
    env = {**os.environ, **seaweedfs.env()}
    proc = subprocess.Popen(
        [sys.executable, CHILD, uri], env=env, stdout=subprocess.PIPE, text=True
    )
    repo = Repo(uri, seaweedfs.storage_options())
    with reaped(proc):
        assert proc.stdout.readline().strip() == "uploading"
        sigkill_when(proc, lambda: len(repo.store.list_keys("blobs")) >= 20)
    versions = repo.versions()
    assert [v.step for v in versions] == [1]  # the small first save; never the torn second
    assert repo.verify("main").ok
    repo.load("main")
