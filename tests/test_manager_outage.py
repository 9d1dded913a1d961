"""A store outage does not end a training run: failed periodic saves are logged and
counted, the next save point tries again, and the run gives up only by SaveFailures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from processes import reaped
from torch import nn

from cloudckpt import (
    CheckpointManager,
    Repo,
    RepoOptions,
    SaveFailures,
    StoreError,
    StoreOptions,
)
from cloudckpt.store import RetryPolicy
from cloudckpt.testing.faults import FaultPlan, FaultProxy
from cloudckpt.testing.local_s3 import free_port

ROOT = Path(__file__).resolve().parent.parent
#: A store that is down refuses connections: two quick attempts, then the save fails.
QUICK = RepoOptions(
    store=StoreOptions(
        connect_timeout=2,
        read_timeout=15,
        retry=RetryPolicy(attempts=2, total_seconds=15, initial_backoff=0.05),
    ),
)


class Outage:
    """The store behind a proxy on a fixed port that can go away and come back."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.port = upstream, free_port()
        self.proxy: FaultProxy | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.proxy = FaultProxy(self.upstream, FaultPlan(rate=0.0), self.port).start()

    def down(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None


@pytest.fixture
def outage(seaweedfs: Any) -> Any:
    found = Outage(seaweedfs.endpoint)
    found.up()
    yield found
    found.down()


def manager(seaweedfs: Any, outage: Outage, uri: str, **kwargs: Any) -> CheckpointManager:
    opts = {**seaweedfs.storage_options(), "endpoint_url": outage.endpoint}
    return CheckpointManager(uri, opts, options=QUICK, save_every_steps=1, **kwargs)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_failed_saves_are_survived_and_the_next_one_lands(
    seaweedfs: Any, outage: Outage, async_save: bool
) -> None:
    uri = seaweedfs.fresh_uri("outage")
    model = nn.Linear(8, 8)
    with manager(seaweedfs, outage, uri, async_save=async_save) as mgr:
        mgr.restore(model=model)
        mgr.step(1)
        mgr.wait()
        outage.down()
        errors = []
        for step in (2, 3):
            result = mgr.step(step)
            errors.append(result.save_error)
            inflight = mgr._saves.background.inflight
            if inflight is not None:  # an async save: let it fail before the next step
                inflight.exception(timeout=30)
        assert mgr.failed_saves >= 1 and result.step == 3
        if not async_save:
            assert all(e and "127.0.0.1" in e for e in errors), errors
        outage.up()
        mgr.step(4)
        mgr.wait()
        assert mgr.failed_saves == 0 and mgr.last_save and mgr.last_save.version.step == 4
    assert Repo(uri, seaweedfs.storage_options()).resolve("main").step == 4


def test_the_run_gives_up_after_consecutive_failures(seaweedfs: Any, outage: Outage) -> None:
    uri = seaweedfs.fresh_uri("outage")
    mgr = manager(seaweedfs, outage, uri, save_failures=SaveFailures(max_consecutive=2))
    mgr.restore(model=nn.Linear(4, 4))
    mgr.step(1)
    outage.down()
    assert mgr.step(2).save_error
    with pytest.raises(StoreError, match="2 saves in a row failed"):
        mgr.step(3)
    outage.up()
    mgr.close()


def test_a_final_save_that_fails_raises_at_once(seaweedfs: Any, outage: Outage) -> None:
    uri = seaweedfs.fresh_uri("outage")
    mgr = manager(seaweedfs, outage, uri)
    mgr.restore(model=nn.Linear(4, 4))
    outage.down()
    with pytest.raises(StoreError):
        mgr.save("final", sync=True)
    outage.up()
    mgr.close()


def test_a_training_run_survives_the_store_stopped_for_30_seconds(
    seaweedfs: Any, outage: Outage, tmp_path: Path
) -> None:
    """Issue 16 item 6: examples/train_gpt.py with its store gone for 30 s mid-run
    finishes with exit 0 and a final version at its last step."""
    uri = seaweedfs.fresh_uri("outage")
    env = {**os.environ, **seaweedfs.env(), "AWS_ENDPOINT_URL": outage.endpoint}
    steps = 120
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "train_gpt.py"),
            "--uri",
            uri,
            "--steps",
            str(steps),
            "--save-every",
            "20",
            "--no-preemption-watcher",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    first_save = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("saved step"):
                first_save.set()

    with reaped(proc):
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert first_save.wait(120), "".join(lines[-30:])
        outage.down()
        time.sleep(30)
        outage.up()
        assert proc.wait(timeout=300) == 0, "".join(lines[-40:])
        reader.join(10)
    assert Repo(uri, seaweedfs.storage_options()).resolve("main").step == steps
    assert any(line.startswith("a save failed") for line in lines) or any(
        "retrying" in line for line in lines
    ), "the outage was not seen"
