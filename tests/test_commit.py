"""The commit transaction against garbage collections and lease takeovers that race it.

Each test replays a reproduction from the protocol-safety issue (docs/protocol.md, I1 and
I3) with the racing operation placed exactly inside the commit or the collection, on
local files and on SeaweedFS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from assertions import assert_state_equal
from processes import reaped

from cloudckpt import Repo, RepoOptions, TransferOptions, versions
from cloudckpt.blobs import blob_key
from cloudckpt.commit import CommitRequest, Transaction
from cloudckpt.errors import CommitConflict, FencedOut
from cloudckpt.lease import WriterLease

CHILD = str(Path(__file__).with_name("child_protocol.py"))
#: Each tensor a blob of its own, so that one can be reused alone.
OPTIONS = RepoOptions(transfer=TransferOptions(pack_below=1024))


def repo_at(root: tuple[str, dict[str, Any]]) -> Repo:
    return Repo(*root, options=OPTIONS)


def state(seed: int, shared: torch.Tensor | None = None) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"own": torch.randn(2048), "shared": torch.randn(2048) if shared is None else shared}


def before_first(
    obj: Any, name: str, action: Callable[[], None], when: Any = None, after: bool = False
) -> None:
    """Run ``action`` once, just before (or ``after``) the first call of ``obj.name``
    that ``when`` accepts."""
    original = getattr(obj, name)
    done: list[bool] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        first = not done and (when is None or when(*args, **kwargs))
        if first:
            done.append(True)
            if not after:
                action()
        result = original(*args, **kwargs)
        if first and after:
            action()
        return result

    setattr(obj, name, wrapped)


def while_running(
    target: Callable[[], None], done: threading.Event, action: Callable[[], None]
) -> None:
    """Run ``target`` in a thread and ``action`` over and over until it sets ``done``
    (at most 200 times, two minutes)."""
    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 120
    for _ in range(200):
        if done.is_set() or time.monotonic() > deadline:
            break
        action()
    thread.join(120)
    assert not thread.is_alive()


def orphan(root: tuple[str, dict[str, Any]]) -> tuple[Repo, torch.Tensor]:
    """A repository whose only copy of a tensor's blob belongs to a deleted version."""
    repo = repo_at(root)
    kept = state(1)
    v1 = repo.commit(kept)
    repo.commit(state(2))
    repo.delete([v1.id])
    # Deleted, and its blobs written, three hours ago (as in the report).
    versions.update(repo.store, lambda ix: ix.deleted.update({v1.id: time.time() - 3 * 3600}))
    if root[0].startswith("file://"):
        for key in repo.store.list_keys():
            old = time.time() - 3 * 3600
            os.utime(repo.store.path(key), (old, old))
    return repo, kept["shared"]


def assert_loads(root: tuple[str, dict[str, Any]], expected: Any, ref: str = "main") -> None:
    """A fresh handle verifies and loads ``ref`` bit-exact."""
    repo = repo_at(root)
    assert repo.verify(ref).ok
    assert_state_equal(expected, repo.load(ref))


@pytest.mark.parametrize("grace", [0.0, 7200.0])
def test_a_commit_between_gc_listing_and_delete_keeps_its_reused_blob(root, grace) -> None:
    """Issue item 1: gc lists, a commit reuses an old orphan and publishes, gc deletes."""
    repo, shared = orphan(root)
    mine = state(3, shared)
    committed: list[Any] = []
    collector = repo_at(root)
    before_first(
        collector.store,
        "list_info",
        lambda: committed.append(repo_at(root).commit(mine)),
        lambda prefix="": prefix == "blobs",
        after=True,
    )
    collector.gc(grace=grace)
    assert committed and repo.resolve("main").id == committed[0].id
    assert_loads(root, mine)


def test_a_collection_during_a_commit_makes_it_store_swept_blobs_again(root) -> None:
    """Issue item 2: the commit found an orphan and reused it; a whole gc ran before it
    published. The commit must notice and store the blob again."""
    _, shared = orphan(root)
    mine = state(3, shared)
    writer = repo_at(root)
    swept: list[list[str]] = []
    before_first(
        writer.store,
        "put_if_absent",
        lambda: swept.append(repo_at(root).gc(grace=0).blobs),
        lambda key, data: key.startswith("manifests/"),
    )
    version = writer.commit(mine)
    shared_blob = {blob_key(c[0]) for e in writer.manifest(version).tensors for c in e["chunks"]}
    assert shared_blob & set(swept[0]), "the collection should have swept the reused orphan"
    assert_loads(root, mine)


def test_a_spread_commit_that_lost_blobs_to_gc_is_refused_not_published(root) -> None:
    """Without the state at hand to upload again, the commit raises instead of
    publishing a version that would not load."""
    repo, shared = orphan(root)
    head = repo.resolve("main").id
    other = repo_at(root)
    txn = Transaction(other.store, other.options.transfer, CommitRequest()).begin()
    entries, stats = txn.writer().write(_leaves(state(3, shared)))
    repo_at(root).gc(grace=0)
    with pytest.raises(CommitConflict, match="garbage collection removed"):
        txn.publish({"dict": []}, entries, stats)
    assert repo.resolve("main").id == head


def _leaves(value: dict[str, Any]) -> list[Any]:
    from cloudckpt import tree

    return tree.flatten(value)[1]


def child_env(request: pytest.FixtureRequest, root: tuple[str, dict[str, Any]]) -> dict[str, str]:
    env = {**os.environ}
    if root[0].startswith("s3://"):
        env.update(request.getfixturevalue("seaweedfs").env())
    if root[0].startswith("gs://"):
        env.update(request.getfixturevalue("fake_gcs").env())
    if root[0].startswith("az://"):
        env.update(request.getfixturevalue("azurite").env())
    return env


def test_a_frozen_writer_is_fenced_out_after_a_takeover(request, root) -> None:
    """Issue item 5: job A is SIGSTOPped before publishing, B takes the lease over after
    its ttl and commits; A resumed must not publish, and the lineage is B's on A's."""
    ttl = 2.0
    proc = subprocess.Popen(
        [sys.executable, CHILD, "commit", root[0], "main", str(ttl)],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(request, root),
    )
    with reaped(proc):
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())["acked"]
        assert json.loads(proc.stdout.readline()) == {"paused": True}
        proc.send_signal(signal.SIGSTOP)
        try:
            repo = repo_at(root)
            time.sleep(ttl + 3.0)  # the ttl, and the store clock's one-second resolution
            lease = WriterLease(repo.store, "main", ttl=30).acquire()
            mine = state(7)
            taken = repo.commit(mine, fence=lease.fence)
        finally:
            proc.send_signal(signal.SIGCONT)
        outcome = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=60) == 0
    assert "fenced" in outcome, outcome
    assert "taken over" in outcome["fenced"]
    again = repo.commit(state(8), fence=lease.fence)
    assert [v.id for v in repo.log()] == [again.id, taken.id, first]
    lease.release()
    assert_loads(root, mine, taken.id)


def test_a_commit_with_an_old_fence_is_refused_before_uploading(root) -> None:
    repo = repo_at(root)
    old = WriterLease(repo.store, "main", ttl=30).acquire()
    repo.commit(state(1), fence=old.fence)
    new = WriterLease(repo.store, "main", ttl=30).acquire(force=True)
    before = set(repo.store.list_keys("blobs"))
    with pytest.raises(FencedOut, match="taken over"):
        repo.commit(state(2), fence=old.fence)
    assert set(repo.store.list_keys("blobs")) == before
    repo.commit(state(3), fence=new.fence)
    old.release()
    new.release()


def test_the_same_bytes_stored_by_two_codecs_at_once_load_in_both_versions(root) -> None:
    """A blob is named by its raw bytes; a writer with another dtype's codec (or level)
    that raced past the HEAD overwrites it with another encoding. Both versions load."""
    data = torch.randn(4096)
    first = repo_at(root).commit({"x": data})
    other = Repo(*root, options=RepoOptions(TransferOptions(pack_below=1024, compression_level=19)))
    original = other.store.stat
    other.store.stat = lambda key: None if key.startswith("blobs/") else original(key)  # type: ignore[method-assign]
    second = other.commit({"x": data.view(torch.uint8).clone()}, branch="main")
    for version, value in ((first, {"x": data}), (second, {"x": data.view(torch.uint8)})):
        assert_loads(root, value, version.id)


def test_a_fenced_out_job_cannot_prune_the_new_owners_versions(root) -> None:
    repo = repo_at(root)
    old = WriterLease(repo.store, "main", ttl=30).acquire()
    doomed = repo.commit(state(1), fence=old.fence)
    new = WriterLease(repo.store, "main", ttl=30).acquire(force=True)
    repo.commit(state(2), fence=new.fence)
    with pytest.raises(FencedOut, match="nothing deleted"):
        repo.delete([doomed.id], fence=old.fence)
    assert doomed.id in repo.index().versions
    repo.delete([doomed.id], fence=new.fence)
    old.release()
    new.release()


def test_a_commit_waiting_for_a_dead_sweep_says_so(root, caplog) -> None:
    repo = repo_at(root)
    repo.commit(state(1))
    versions.update(repo.store, lambda ix: ix.sweeps.update({"dead": versions.Sweep(0, 1.0)}))
    caplog.set_level("INFO", "cloudckpt")
    started = time.monotonic()
    repo.commit(state(2))
    assert time.monotonic() - started >= 1.0
    assert "waiting for 1 garbage collection sweep(s)" in caplog.text
    assert "treating them as dead" in caplog.text and not repo.index().sweeps
