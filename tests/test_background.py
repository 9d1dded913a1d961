"""Background saves: one in flight, its result or error handed to the caller, the
snapshot independent of later changes to the live state."""

from __future__ import annotations

import threading

import pytest
import torch

from cloudckpt.background import BackgroundSaver


def test_a_save_runs_in_the_background_and_wait_returns_its_result() -> None:
    saver = BackgroundSaver[int]("test-save")
    release = threading.Event()
    saver.submit(lambda: release.wait(10) and 7)
    assert saver.running and not saver.failed
    with pytest.raises(RuntimeError, match="in flight"):
        saver.submit(lambda: 8)  # one at a time
    release.set()
    assert saver.wait() == 7
    assert not saver.running and saver.wait() is None  # nothing left to wait for
    saver.close()


def test_an_error_is_raised_to_the_caller_once_never_swallowed() -> None:
    saver = BackgroundSaver[None]("test-save")

    def broken() -> None:
        raise OSError("upload failed")

    saver.submit(broken).exception(timeout=10)
    assert saver.failed
    with pytest.raises(OSError, match="upload failed"):
        saver.collect()
    saver.collect()  # collected: not raised twice
    saver.submit(broken).exception(timeout=10)
    with pytest.raises(OSError):
        saver.close()  # close raises it too, and still stops the thread


def test_collect_leaves_a_running_save_alone() -> None:
    saver = BackgroundSaver[None]("test-save")
    release = threading.Event()
    saver.submit(release.wait, 10)
    saver.collect()
    assert saver.running
    release.set()
    saver.close()


def test_when_busy_skip_skips_and_wait_waits() -> None:
    release = threading.Event()
    skipping = BackgroundSaver[None]("test-save", when_busy="skip")
    skipping.submit(release.wait, 10)
    assert not skipping.make_room(busy=True)
    assert skipping.running
    assert not skipping.make_room(busy=True, may_skip=True)
    release.set()
    assert skipping.make_room(busy=True, may_skip=False)  # a final save always waits
    assert not skipping.running
    waiting = BackgroundSaver[None]("test-save")
    waiting.submit(lambda: None)
    assert waiting.make_room(busy=True) and not waiting.running
    with pytest.raises(ValueError):
        BackgroundSaver[None]("test-save", when_busy="drop")  # type: ignore[arg-type]


def test_the_snapshot_is_not_changed_by_later_training() -> None:
    saver = BackgroundSaver[None]("test-save")
    live = {"w": torch.zeros(3), "lr": [0.1]}
    snapshot = saver.snapshot(live)
    live["w"].add_(1.0)
    live["lr"][0] = 0.5
    assert snapshot["w"].tolist() == [0.0, 0.0, 0.0] and snapshot["lr"] == [0.1]
    release = threading.Event()
    saver.submit(release.wait, 10)
    with pytest.raises(RuntimeError, match="buffers"):
        saver.snapshot(live)  # the upload still reads the buffers
    release.set()
    saver.close()
