"""``repair`` racing committers, and what it may bring back (docs/protocol.md, I2 and I4),
on local files and on SeaweedFS."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from test_commit import before_first, repo_at, state, while_running

from cloudckpt import manifest, versions
from cloudckpt.commit import CommitRequest, Transaction
from cloudckpt.errors import CommitConflict, FencedOut, UnsupportedFormat
from cloudckpt.lease import WriterLease


def test_repair_racing_a_committer_keeps_every_acknowledged_commit(root) -> None:
    """Issue item 3: commits landing while repair lists were dropped and the head moved
    back."""
    repo = repo_at(root)
    acked = [repo.commit(state(0)).id]
    fixer = repo_at(root)
    before_first(
        fixer.store,
        "list_keys",
        lambda: acked.extend(repo.commit(state(i)).id for i in (1, 2, 3)),
        lambda prefix="": prefix == manifest.PREFIX,
        after=True,
    )
    repaired = fixer.repair()
    index = repo.index()
    assert set(acked) <= set(index.versions) and set(acked) <= set(repaired.versions)
    assert index.branches["main"] == acked[-1]


def test_repair_in_a_loop_beside_a_committer_drops_nothing(root) -> None:
    repo = repo_at(root)
    acked: list[str] = []
    heads: list[str] = []
    done = threading.Event()

    def commits() -> None:
        try:
            for i in range(12):
                acked.append(repo.commit(state(i)).id)
        finally:
            done.set()

    fixer = repo_at(root)

    def repair() -> None:
        fixer.repair()
        heads.append(fixer.index().branches.get("main", ""))

    while_running(commits, done, repair)
    index = repo.index()
    assert set(acked) <= set(index.versions) and index.branches["main"] == acked[-1]
    order = {vid: n for n, vid in enumerate(acked)}
    seen = [order[h] for h in heads if h]
    assert seen == sorted(seen), "a branch head moved backwards"


def rejected_commit(root: tuple[str, dict[str, Any]]) -> tuple[str, str]:
    """A commit that lost the race to another (CommitConflict) and left its manifest;
    returns (the winner's id, the loser's manifest key)."""
    repo = repo_at(root)
    repo.commit(state(0))
    loser = repo_at(root)
    won: list[str] = []
    before_first(
        loser.store,
        "put_if_absent",
        lambda: won.append(repo.commit(state(1)).id),
        lambda key, data: key.startswith("manifests/"),
    )
    with pytest.raises(CommitConflict, match="moved"):
        loser.commit(state(2))
    left = set(repo.store.list_keys(manifest.PREFIX)) - {
        manifest.key(v) for v in repo.index().versions
    }
    assert len(left) == 1
    return won[0], left.pop()


def test_repair_never_promotes_a_rejected_commit(root) -> None:
    """Issue item 4: the loser's manifest became the head of main after repair."""
    winner, _ = rejected_commit(root)
    repo = repo_at(root)
    repaired = repo.repair()
    assert repaired.branches["main"] == winner
    repo.store.put(versions.KEY, b"{garbled")  # rebuilt from scratch: the same
    rebuilt = repo.repair()
    assert rebuilt.branches["main"] == winner and len(rebuilt.versions) == 2


def test_repair_restores_a_lost_row_and_moves_the_head_only_forward(root) -> None:
    repo = repo_at(root)
    v1 = repo.commit(state(1))
    v2 = repo.commit(state(2))
    v3 = repo.commit(state(3))

    def lose(ix: versions.Index) -> None:  # an old tool rewrote the index without v2, v3
        del ix.versions[v2.id], ix.versions[v3.id]
        ix.branches["main"] = v1.id

    versions.update(repo.store, lose)
    repaired = repo.repair()
    assert repaired.branches["main"] == v3.id and {v2.id, v3.id} <= set(repaired.versions)
    assert repo.repair().versions.keys() == repaired.versions.keys()  # nothing more to do


def test_repair_does_not_bring_back_a_deleted_version(root) -> None:
    repo = repo_at(root)
    v1 = repo.commit(state(1))
    repo.commit(state(2))
    repo.delete([v1.id])
    assert v1.id not in repo.repair().versions
    repo.gc(grace=0)
    repo.store.put(versions.KEY, b"{garbled")
    assert v1.id not in repo.repair().versions


def test_a_rebuilt_index_fences_out_every_earlier_lease(root) -> None:
    repo = repo_at(root)
    lease = WriterLease(repo.store, "main", ttl=30).acquire()
    repo.commit(state(1), fence=lease.fence)
    repo.store.put(versions.KEY, b"{garbled")
    rebuilt = repo.repair()
    assert rebuilt.fences["main"] > lease.fence
    with pytest.raises(FencedOut):
        repo.commit(state(2), fence=lease.fence)
    lease.release()


def test_a_rebuilt_index_makes_commits_wait_for_a_sweep_it_could_not_see(root) -> None:
    """A collection may be deleting while the index is rebuilt; its entry is lost with the
    index, so the rebuilt one holds a stand-in that running commits must wait out and
    that stops the collection's renewal."""
    repo = repo_at(root)
    repo.commit(state(1))
    repo.store.put(versions.KEY, b"{garbled")
    rebuilt = repo.repair()
    assert len(rebuilt.sweeps) == 1
    txn = Transaction(repo.store, repo.options.transfer, CommitRequest())
    assert not txn.begin().start.clean  # type: ignore[union-attr]


def test_repair_refuses_to_rebuild_an_index_of_a_newer_format(root) -> None:
    repo = repo_at(root)
    repo.commit(state(1))
    newer = json.dumps({"format": 3, "something": "new"}).encode()
    repo.store.put(versions.KEY, newer)
    with pytest.raises(UnsupportedFormat, match="upgrade cloudckpt"):
        repo.repair()
    assert repo.store.get(versions.KEY) == newer


def test_a_rebuilt_head_follows_parent_links_not_the_writers_clocks(root) -> None:
    repo = repo_at(root)
    first = repo.commit(state(1))
    repo.commit(state(2))
    last = repo.commit(state(3))
    doc = json.loads(repo.store.get(manifest.key(first.id)))  # its writer's clock was ahead
    doc["created"] = first.created + 600
    repo.store.put(manifest.key(first.id), json.dumps(doc).encode())
    repo.store.put(versions.KEY, b"{garbled")
    assert repo.repair().branches["main"] == last.id


def test_a_malformed_manifest_is_skipped_by_repair(root) -> None:
    repo = repo_at(root)
    kept = repo.commit(state(1))
    bad = "20261201T000000000Z-deadbeef"
    repo.store.put(
        manifest.key(bad),
        json.dumps(
            {
                "format": 2,
                "id": bad,
                "branch": "main",
                "state": {},
                "tensors": [{"path": "x", "chunks": 5}],
            }
        ).encode(),
    )
    repo.store.put(manifest.marker_key(bad), b"{}")
    repo.store.put(versions.KEY, b"{garbled")
    assert set(repo.repair().versions) == {kept.id}


def test_a_rebuilt_index_keeps_fencing_a_branch_that_has_only_a_lease(root) -> None:
    repo = repo_at(root)
    repo.commit(state(1))
    stale = WriterLease(repo.store, "exp", ttl=30).acquire()  # no version on exp yet
    repo.store.put(versions.KEY, b"{garbled")
    assert repo.repair().fences["exp"] > stale.fence
    stale.release()
