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
from test_commit import (
    assert_loads,
    before_first,
    child_env,
    orphan,
    repo_at,
    state,
    while_running,
)
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


@pytest.mark.parametrize("failing", ["gc", "delete"])
def test_failed_retention_does_not_fail_the_save_that_ran_it(root, caplog, failing) -> None:
    """Issue item 7: the manager's periodic gc raised although the commit had landed (and
    so did a delete that lost a race with an operator tagging the doomed version)."""
    mgr = CheckpointManager(*root, save_every_steps=1, keep_last=1, gc_every=1, gc_grace=0)
    net = nn.Linear(8, 8)
    mgr.restore(model=net)
    mgr.step(1)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("the store refused it")

    setattr(mgr.repo, failing, broken)
    mgr.step(2)  # prunes step 1, and that fails
    assert mgr.last_save is not None and mgr.last_save.version.step == 2
    assert mgr.committed_step == 2
    assert "retention after step 2 failed (the save landed)" in caplog.text
    mgr.close()


@pytest.mark.parametrize("grace", [0, 60])
def test_temporary_files_of_killed_writers_are_swept_not_those_being_written(
    tmp_path, grace
) -> None:
    """Issue item 8: ``.tmp-*`` files left by writers killed mid-write on file://; but a
    file a running writer is still writing is kept, even with grace 0."""
    repo = repo_at((f"file://{tmp_path}/repo", {}))
    repo.commit(state(1))
    old = Path(repo.store.path("blobs/ab/.tmp-killed"))
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_bytes(b"half a blob")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    writing = Path(repo.store.path("manifests/.tmp-writing"))
    writing.write_bytes(b"{")
    assert repo.gc(grace=grace, abandoned_after=3600).aborted_uploads == 1
    assert not old.exists() and writing.exists()


def test_a_frozen_collection_stops_before_deleting_what_a_commit_reused(request, root) -> None:
    """A collection SIGSTOPped after deciding, past its sweep's ttl: a commit waiting for
    it treats it as dead and reuses a condemned blob; resumed, the collection must not
    delete by its stale decision."""
    repo, shared = orphan(root)
    proc = subprocess.Popen(
        [sys.executable, CHILD, "gc", root[0], "1.5"],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(request, root),
    )
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

    collector = repo_at(root)
    while_running(commits, done, lambda: collector.gc(grace=0))
    assert not errors, errors
    for vid, value in acked.items():
        assert_loads(root, value, vid)


def test_a_version_deleted_after_the_listing_keeps_its_tombstone(root) -> None:
    """Committed and deleted between the collection's listing and its sweep: nothing of
    it was listed, so nothing was swept; its tombstone must stay, or repair brings back
    a version that was deleted."""
    repo = repo_at(root)
    repo.commit(state(1))
    late: list[str] = []

    def commit_and_delete() -> None:
        late.append(repo.commit(state(2)).id)
        repo.commit(state(3))
        repo.delete(late)

    collector = repo_at(root)
    before_first(
        collector.store,
        "list_info",
        commit_and_delete,
        lambda prefix="": prefix == "blobs",
        after=True,
    )
    collector.gc(grace=0)
    assert late[0] in repo.index().deleted
    assert late[0] not in repo.repair().versions
    repo.gc(grace=0)  # the next collection sweeps it and forgets it
    assert late[0] not in repo.index().deleted and late[0] not in repo.repair().versions


def test_a_collection_whose_last_swap_lost_its_response_finishes(root) -> None:
    repo, _ = orphan(root)
    collector = repo_at(root)
    replace = collector.store.backend.put_if_match
    lost: list[bool] = []

    def applied_then_reset(path: str, data: bytes, etag: str | None) -> str:
        out = replace(path, data, etag)
        ending = path.endswith("versions.json") and b'"sweeps": {}' in data
        if ending and not lost:
            lost.append(True)
            raise ConnectionResetError("the response was lost")
        return out

    collector.store.backend.put_if_match = applied_then_reset  # type: ignore[method-assign]
    report = collector.gc(grace=0)
    assert lost and report.blobs and not repo.index().sweeps


def test_a_malformed_unpublished_manifest_does_not_stop_gc(root, caplog) -> None:
    repo = repo_at(root)
    kept = state(1)
    repo.commit(kept)
    repo.store.put(
        "manifests/20261201T000000000Z-deadbeef.json",
        json.dumps(
            {
                "format": 2,
                "id": "20261201T000000000Z-deadbeef",
                "branch": "main",
                "state": {},
                "tensors": [{"path": "x", "chunks": 5}],
            }
        ).encode(),
    )
    repo.gc(grace=3600)
    assert "skipping unreadable manifest" in caplog.text
    assert_loads(root, kept)


def test_objects_not_of_the_layout_are_left_alone_not_a_failure(caplog) -> None:
    """Keys gc did not make (another tool's, hostile names with ``..``) are neither
    deleted nor allowed to stop a collection."""
    from cloudckpt import Repo

    repo = Repo("memory://gc-foreign/repo")
    dropped = repo.commit({"w": torch.zeros(3)})
    kept = repo.commit({"w": torch.arange(10.0)})
    repo.delete([dropped.id])
    foreign = [
        "blobs/ab/not-a-hash",
        "manifests/sub/x.json",
        "published/.hidden",
        "blobs/../outside",
        "manifests/../../x.json",
    ]
    for key in foreign:  # written past Store's key check, as another client could
        repo.store.fs.pipe_file(f"{repo.store.root}/{key}", b"theirs")
    report = repo.gc(grace=0)
    assert report.blobs and "not cloudckpt's" in caplog.text
    for key in foreign:
        assert repo.store.fs.cat_file(f"{repo.store.root}/{key}") == b"theirs"
    assert torch.equal(repo.load(kept.id)["w"], torch.arange(10.0))
