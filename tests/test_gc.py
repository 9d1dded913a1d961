"""Garbage collection against other collections, frozen collections and killed writers
(docs/protocol.md, I1 and I5), on local files and on SeaweedFS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import reaped
from test_commit import assert_loads, before_first, child_env, orphan, repo_at, state
from torch import nn

from cloudckpt import CheckpointManager
from cloudckpt.errors import StoreError
from cloudckpt.gc import collect

CHILD = str(Path(__file__).with_name("child_protocol.py"))


def test_two_collections_at_once_both_finish(root) -> None:
    """Issue item 7: the second collection deleted first; the first must not fail."""
    repo, _ = orphan(root)
    other: list[Any] = []
    first = repo_at(root)
    before_first(first.store, "delete", lambda: other.append(repo_at(root).gc(grace=0)))
    report = first.gc(grace=0)
    assert other and other[0].blobs and report.blobs == other[0].blobs
    assert repo.versions() and all(repo.verify(v.id).ok for v in repo.versions())


def test_a_failed_collection_does_not_fail_the_save_that_ran_it(root, caplog) -> None:
    """Issue item 7: the manager's periodic gc raised although the commit had landed."""
    mgr = CheckpointManager(*root, save_every_steps=1, keep_last=1, gc_every=1, gc_grace=0)
    net = nn.Linear(8, 8)
    mgr.restore(model=net)
    mgr.step(1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the store refused the delete")

    mgr.repo.gc = broken  # type: ignore[method-assign]
    mgr.step(2)  # prunes step 1, then the collection fails
    assert mgr.last_save is not None and mgr.last_save.version.step == 2
    assert "garbage collection after step 2 failed" in caplog.text
    mgr.close()


def test_temporary_files_of_killed_writers_are_swept(tmp_path) -> None:
    """Issue item 8: ``.tmp-*`` files left by writers killed mid-write on file://."""
    root = (f"file://{tmp_path}/repo", {})
    repo = repo_at(root)
    repo.commit(state(1))
    old = Path(repo.store.path("blobs/ab/.tmp-killed"))
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(b"half a blob")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    young = Path(repo.store.path("manifests/.tmp-writing"))
    young.write_bytes(b"{")
    report = repo.gc(grace=3600)
    assert report.aborted_uploads == 1
    assert not old.exists() and young.exists()


def test_a_frozen_collection_stops_before_deleting_what_a_commit_reused(request, root) -> None:
    """A collection SIGSTOPped after deciding, past its sweep's ttl: a commit waiting for
    it treats it as dead and reuses a condemned blob; resumed, the collection must not
    delete by its stale decision."""
    repo, shared = orphan(root)
    proc = subprocess.Popen(
        [sys.executable, CHILD, "gc", root[0], "1.5"],
        stdout=subprocess.PIPE, text=True, env=child_env(request, root),
    )  # fmt: skip
    with reaped(proc):
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"paused": True}
        proc.send_signal(signal.SIGSTOP)
        try:
            mine = state(3, shared)
            started = time.monotonic()
            version = repo_at(root).commit(mine)  # waits for the frozen sweep's ttl
            waited = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGCONT)
        outcome = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=60) == 0
    assert "expired" in outcome, outcome
    assert waited >= 1.5
    assert_loads(root, mine, version.id)
    assert collect(repo.store, grace=0).blobs  # the next collection sweeps the rest


def test_a_negative_grace_is_refused(root) -> None:
    with pytest.raises(ValueError, match="grace"):
        repo_at(root).gc(grace=-1.0)


def test_commits_and_collections_in_threads_lose_nothing(root) -> None:
    """Commits reusing and deleting while collections with grace 0 run back to back."""
    repo = repo_at(root)
    shared = torch.randn(2048)
    acked: dict[str, Any] = {}
    errors: list[BaseException] = []
    done = threading.Event()

    def commits() -> None:
        try:
            for i in range(8):
                value = state(i, shared)
                acked[repo.commit(value).id] = value
                if i % 3 == 2:
                    old = [v for v in acked if v != repo.resolve("main").id][:1]
                    repo.delete(old)
                    for vid in old:
                        acked.pop(vid)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=commits)
    thread.start()
    collector = repo_at(root)
    for _ in range(200):
        if done.is_set():
            break
        collector.gc(grace=0)
    thread.join(120)
    assert not errors, errors
    for vid, value in acked.items():
        assert_loads(root, value, vid)
