"""Uploads from the local tier racing the bucket's own maintenance (docs/tiers.md T1, T5;
protocol.md I1-I3): a manager whose every bucket save is an upload from its local tier,
with retention deleting the version before it, while another thread runs ``gc`` with
grace 0 and ``repair`` back to back. The state repeats earlier blobs (a tensor that
cycles through three values, a frozen one that never changes), so uploads skip blobs
the bucket holds only for versions being deleted and collected -- exactly what a
collection may remove in the middle of an upload.

After every step: the bucket's head is the step just saved and verifies, and the state
saved at that step loads from the bucket bit-exact. At the end another host (no local
tier) resumes the last step exactly from the bucket."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import torch
from assertions import assert_state_equal

from cloudckpt import CheckpointManager, HealthCheck, LocalTier, Repo

STEPS = 10


class CyclingState(torch.nn.Module):
    """A trained layer, a frozen block (the same blobs in every version) and a buffer
    that returns to a value three steps later (blobs of deleted versions come back)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.layer = torch.nn.Linear(64, 64)
        self.frozen = torch.nn.Parameter(torch.randn(512, 256), requires_grad=False)
        self.register_buffer("phase", torch.zeros(1 << 16))

    def at(self, step: int) -> None:
        self.phase.fill_(step % 3)


def test_uploads_from_the_tier_lose_nothing_to_gc_repair_and_retention_at_once(
    seaweedfs: Any, tmp_path: Any
) -> None:
    uri, opts = seaweedfs.fresh_uri("tier-races"), seaweedfs.storage_options()
    model = CyclingState()
    opt = torch.optim.SGD(model.layer.parameters(), lr=0.1, momentum=0.9)
    mgr = CheckpointManager(
        uri,
        opts,
        local=LocalTier(str(tmp_path / "tier"), every_steps=1, host="h0", keep=2),
        health=HealthCheck(spike_factor=1e9),
        save_every_steps=1,
        keep_last=1,
    )
    mgr.restore(model=model, optimizer=opt)
    collector = Repo(uri, opts)
    done = threading.Event()
    rounds = {"gc": 0, "repair": 0, "reclaimed": 0}
    errors: list[BaseException] = []

    def maintain() -> None:
        deadline = time.monotonic() + 240
        try:
            while not done.is_set() and time.monotonic() < deadline and rounds["gc"] < 2000:
                rounds["reclaimed"] += len(collector.gc(grace=0).blobs)
                rounds["gc"] += 1
                collector.repair()
                rounds["repair"] += 1
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=maintain, name="maintenance")
    thread.start()
    saved: dict[int, dict[str, Any]] = {}
    try:
        for step in range(1, STEPS + 1):
            loss = model.layer(torch.randn(8, 64)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.at(step)
            result = mgr.step(step, metrics={"loss": loss.item()})
            assert result.saved is not None and result.saved.tier == "bucket", result
            saved[step] = copy.deepcopy(
                {"model": model.state_dict(), "optimizer": opt.state_dict()}
            )
            bucket = Repo(uri, opts)
            head = bucket.resolve("main")
            assert head.step == step and head.id == result.saved.version.id
            assert bucket.verify(head.id).ok
            loaded = bucket.load(head.id)
            assert_state_equal(saved[step]["model"], loaded["model"])
    finally:
        done.set()
        thread.join(300)
        mgr.close()
    assert not thread.is_alive() and not errors, errors
    assert rounds["gc"] >= STEPS and rounds["repair"] >= STEPS, rounds
    assert rounds["reclaimed"] > 0, rounds  # retention's deletions were being collected

    other = CyclingState()
    other_opt = torch.optim.SGD(other.layer.parameters(), lr=0.1, momentum=0.9)
    fresh = CheckpointManager(uri, opts, health=HealthCheck(spike_factor=1e9))
    assert fresh.restore(model=other, optimizer=other_opt).step == STEPS
    assert_state_equal(saved[STEPS]["model"], other.state_dict())
    assert_state_equal(saved[STEPS]["optimizer"], other_opt.state_dict())
    fresh.close()
