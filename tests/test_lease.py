"""Writer leases: a second job on a branch fails fast naming the first (real processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from processes import reaped
from torch import nn

from cloudckpt import CheckpointManager
from cloudckpt.errors import CheckpointNotFound, LeaseHeld
from cloudckpt.lease import WriterLease
from cloudckpt.store import Store

CHILD = str(Path(__file__).with_name("child_lease.py"))


@contextmanager
def holder(
    server: Any, uri: str, branch: str = "main", *elsewhere: str
) -> Iterator[subprocess.Popen[str]]:
    """A job in another process holding ``branch``'s lease until the block ends
    (``elsewhere``: the host name and lease ttl of a job on another machine)."""
    proc = subprocess.Popen(
        [sys.executable, CHILD, uri, branch, *elsewhere],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **server.env()},
    )
    with reaped(proc):
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["held"]
        yield proc


def release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_a_second_job_on_the_branch_fails_fast_naming_the_first(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("lease")
    with holder(seaweedfs, uri) as first:
        start = time.monotonic()
        with pytest.raises(LeaseHeld) as err:
            CheckpointManager(uri, seaweedfs.storage_options()).restore(model=nn.Linear(4, 4))
        assert time.monotonic() - start < 5
        message = str(err.value)
        assert f"pid {first.pid}" in message and repr(socket.gethostname()) in message
        assert re.search(r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", message), message
        assert "another branch" in message
        release(first)
    with CheckpointManager(uri, seaweedfs.storage_options()) as second:
        assert second.restore(model=nn.Linear(4, 4)).step == 1


def test_jobs_on_different_branches_run_side_by_side(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("lease")
    with holder(seaweedfs, uri, "main") as first:
        opts = seaweedfs.storage_options()
        with CheckpointManager(uri, opts, branch="exp", new_branch=True) as other:
            other.restore(model=nn.Linear(4, 4))
            assert other.save() is not None
        release(first)


def test_a_killed_holder_on_this_host_does_not_block_the_restart(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("lease")
    with holder(seaweedfs, uri) as first:
        first.kill()
        first.wait(timeout=30)
    with CheckpointManager(uri, seaweedfs.storage_options()) as restarted:
        assert restarted.restore(model=nn.Linear(4, 4)).step == 1


def test_renewal_keeps_a_lease_and_an_unrenewed_one_expires(seaweedfs: Any) -> None:
    store = Store(seaweedfs.fresh_uri("lease"), seaweedfs.storage_options())
    mine = WriterLease(store, "main", ttl=0.6).acquire()

    def elsewhere() -> WriterLease:  # a job on another machine
        lease = WriterLease(store, "main", ttl=0.6)
        lease.me = dataclasses.replace(lease.me, host="another-machine")
        return lease

    time.sleep(1.5)  # past the ttl: only the heartbeat keeps it
    with pytest.raises(LeaseHeld, match="another branch"):
        elsewhere().acquire()
    mine._stop.set()  # the holder's machine vanishes: no more renewals
    mine._thread.join(5)  # type: ignore[union-attr]
    time.sleep(3.0)  # the ttl, and the store clock's one-second resolution
    taken = elsewhere().acquire()
    with pytest.raises(LeaseHeld, match="lost its writer lease"):
        mine.check()
    taken.release()
    assert json.loads(store.get("leases/main.json"))["released"] is True
    WriterLease(store, "main", ttl=60).acquire().release()  # free at once


def test_a_manager_that_lost_its_lease_cannot_save(seaweedfs: Any) -> None:
    uri, opts = seaweedfs.fresh_uri("lease"), seaweedfs.storage_options()
    first = CheckpointManager(uri, opts)
    first.restore(model=nn.Linear(4, 4))
    with CheckpointManager(uri, opts) as second:  # this process's newer manager wins
        second.restore(model=nn.Linear(4, 4))
        with pytest.raises(LeaseHeld, match="lost its writer lease"):
            first.save()
        assert second.save() is not None


def test_not_exclusive_takes_no_lease(seaweedfs: Any) -> None:
    uri, opts = seaweedfs.fresh_uri("lease"), seaweedfs.storage_options()
    with CheckpointManager(uri, opts, exclusive=False, save_every_steps=1) as mgr:
        mgr.restore(model=nn.Linear(4, 4))
        mgr.step(1)
        assert Store(uri, opts).list_keys("leases") == []


def planted(store: Store, **holder: Any) -> None:
    """Write a lease as another job would have, renewed just now, with ``holder`` fields."""
    me = WriterLease(store, "main").me
    doc = {**dataclasses.asdict(me), "token": "someone-else", "renewed": time.time(), **holder}
    store.put("leases/main.json", json.dumps(doc).encode())


def test_a_live_holder_in_another_pid_namespace_is_not_taken_over(seaweedfs: Any) -> None:
    """Issue item 6a: two containers share a host name, not a pid namespace; the holder
    is pid 1 there (or any pid that does not exist here)."""
    store = Store(seaweedfs.fresh_uri("lease"), seaweedfs.storage_options())
    for pid in (1, 2**22 - 1):
        planted(store, pid=pid, pidns="4026532999", ttl=60.0)
        with pytest.raises(LeaseHeld, match="is being written by"):
            WriterLease(store, "main", ttl=60).acquire()


def test_staleness_is_judged_by_the_holders_ttl(seaweedfs: Any) -> None:
    """Issue item 6b: a job with ttl=1 took over a live ttl=30 lease after 1 s."""
    store = Store(seaweedfs.fresh_uri("lease"), seaweedfs.storage_options())
    planted(store, host="another-machine", ttl=30.0)
    time.sleep(2.5)
    with pytest.raises(LeaseHeld, match=r"wait (2[0-9]|3[0-2])s"):
        WriterLease(store, "main", ttl=1).acquire()


def test_a_reused_pid_does_not_keep_a_dead_holders_lease(seaweedfs: Any) -> None:
    """The holder's pid now names another process (our parent): its start time differs."""
    store = Store(seaweedfs.fresh_uri("lease"), seaweedfs.storage_options())
    planted(store, pid=os.getppid(), start="1", ttl=60.0)
    lease = WriterLease(store, "main", ttl=60).acquire()
    assert lease.held and lease.fence == 1
    lease.release()


def test_each_holder_raises_the_fencing_token(seaweedfs: Any) -> None:
    store = Store(seaweedfs.fresh_uri("lease"), seaweedfs.storage_options())
    fences = []
    for _ in range(3):
        with WriterLease(store, "main", ttl=60) as lease:
            fences.append(lease.fence)
    forced = WriterLease(store, "main", ttl=60).acquire()
    taker = WriterLease(store, "main", ttl=60).acquire(force=True)
    assert fences == [1, 2, 3] and (forced.fence, taker.fence) == (4, 5)
    with pytest.raises(LeaseHeld, match="lost its writer lease"):
        forced.check()
    taker.release()


def test_a_holder_that_stalled_before_raising_the_fence_cannot_fence_its_successor(
    seaweedfs: Any,
) -> None:
    """A took the lease object, then stalled past its ttl before raising the branch's
    token; B took over and raised it. A's late raise must fail, not fence B out."""
    from cloudckpt import Repo

    uri, opts = seaweedfs.fresh_uri("lease"), seaweedfs.storage_options()
    a = WriterLease(Store(uri, opts), "main", ttl=1)
    a.me = dataclasses.replace(a.me, host="machine-a")
    taken: list[WriterLease] = []
    original = a._raise_fence

    def stall_then_raise_fence() -> None:  # A stalls between its two swaps
        time.sleep(3.5)  # past A's ttl and the store clock's one-second resolution
        taken.append(WriterLease(Store(uri, opts), "main", ttl=60).acquire())
        original()  # A's late raise of the token

    a._raise_fence = stall_then_raise_fence  # type: ignore[method-assign]
    with pytest.raises(LeaseHeld, match="lost its writer lease"):
        a.acquire()
    b = taken[0]
    Repo(uri, opts).commit({"w": nn.Linear(2, 2).weight.detach()}, fence=b.fence)
    b.release()


def test_a_late_release_does_not_free_the_next_holders_lease(seaweedfs: Any) -> None:
    store = Store(seaweedfs.fresh_uri("lease"), seaweedfs.storage_options())
    a = WriterLease(store, "main", ttl=60).acquire()
    b = WriterLease(store, "main", ttl=60).acquire(force=True)
    a.release()  # A wakes up and releases what is no longer its lease
    assert json.loads(store.get("leases/main.json"))["token"] == b.me.token
    with pytest.raises(LeaseHeld, match="is being written by"):
        other = WriterLease(store, "main", ttl=60)
        other.me = dataclasses.replace(other.me, host="machine-c")
        other.acquire()
    b.release()


def test_a_vanished_lease_object_is_a_lost_lease_not_a_dead_heartbeat(seaweedfs: Any) -> None:
    store = Store(seaweedfs.fresh_uri("lease"), seaweedfs.storage_options())
    lease = WriterLease(store, "main", ttl=60).acquire()
    store.delete(["leases/main.json"])
    lease.renew()  # no exception: the heartbeat thread must not die of it
    assert not lease.held
    with pytest.raises(LeaseHeld, match="lost its writer lease"):
        lease.check()


def test_a_local_clock_far_ahead_does_not_expire_a_live_lease(tmp_path, monkeypatch) -> None:
    """On a file system shared between machines, ages come from the file system's clock
    (a file written now), not from this machine's."""
    store = Store(f"file://{tmp_path}/repo")
    planted(store, host="another-machine", ttl=60.0)
    ahead = time.time() + 600
    monkeypatch.setattr("cloudckpt.store.local.time.time", lambda: ahead)
    monkeypatch.setattr("cloudckpt.lease.time.time", lambda: ahead)
    with pytest.raises(LeaseHeld, match="is being written by"):
        WriterLease(store, "main", ttl=60).acquire()


def test_a_replacement_machine_waits_out_a_killed_holder_and_resumes(
    seaweedfs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16 item 7: after SIGKILL on machine A, the job on machine B resumes (no
    crash loop) within the holder's ttl + 10 s."""
    uri = seaweedfs.fresh_uri("lease")
    with holder(seaweedfs, uri, "main", "machine-a", "4") as first:
        first.kill()
        first.wait(timeout=30)
    start = time.monotonic()
    with CheckpointManager(uri, seaweedfs.storage_options()) as replacement:
        assert replacement.restore(model=nn.Linear(4, 4)).step == 1
    assert time.monotonic() - start < 4 + 10
    assert "waiting up to" in caplog.text and "machine-a" in caplog.text


def test_a_holder_that_keeps_renewing_is_not_taken_over(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("lease")
    ttl = 6  # long enough that failing fast and waiting it out differ on a loaded machine
    with holder(seaweedfs, uri, "main", "machine-a", str(ttl)) as first:
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match="renewed its lease while this job waited"):
            CheckpointManager(uri, seaweedfs.storage_options()).restore(model=nn.Linear(4, 4))
        assert time.monotonic() - start < ttl + 5
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match=r"wait [0-9]+s for its lease to expire"):
            CheckpointManager(uri, seaweedfs.storage_options(), lease_wait=False).restore(
                model=nn.Linear(4, 4)
            )
        assert time.monotonic() - start < ttl - 2
        release(first)


def test_a_typod_branch_is_refused_naming_the_branches_that_exist(tmp_path: Path) -> None:
    """Issue 16 item 3: ``branch="mian"`` was a silent fresh run."""
    uri = f"file://{tmp_path}/repo"
    with CheckpointManager(uri, save_every_steps=1) as mgr:
        mgr.restore(model=nn.Linear(4, 4))
        mgr.step(1)
    with pytest.raises(CheckpointNotFound, match=r"branch 'mian' has no versions.*main"):
        CheckpointManager(uri, branch="mian").restore(model=nn.Linear(4, 4))
    with CheckpointManager(uri, branch="mian", new_branch=True, save_every_steps=1) as mgr:
        assert mgr.restore(model=nn.Linear(4, 4)).step == 0  # the lease was given back
        mgr.step(1)
    with CheckpointManager(uri, branch="mian") as mgr:
        assert mgr.restore(model=nn.Linear(4, 4)).step == 1


@pytest.mark.parametrize(
    "holder", [{"pid": 2**31}, {"pid": 0}, {"started": 1e12}, {"ttl": 86400.0}, {"fence": -1}]
)
def test_a_lease_with_values_out_of_range_is_unreadable_and_taken(tmp_path, holder) -> None:
    """Same machine, same boot, same pid namespace, as a lease of this machine would be:
    out-of-range values must not reach os.kill or the date formatting."""
    store = Store(f"file://{tmp_path}/repo")
    planted(store, **holder)
    lease = WriterLease(store, "main", ttl=60).acquire()
    assert lease.held
    lease.release()


def test_a_fencing_token_at_its_maximum_is_corrupt_not_written_past(tmp_path) -> None:
    from cloudckpt import Repo, schema
    from cloudckpt.errors import CorruptCheckpoint

    repo = Repo(f"file://{tmp_path}/repo")
    repo.commit({"w": nn.Linear(2, 2).weight.detach()})
    index = json.loads(repo.store.get("versions.json"))
    index["fences"] = {"main": schema.MAX_INT}
    repo.store.put("versions.json", json.dumps(index).encode())
    with pytest.raises(CorruptCheckpoint, match=r"at its maximum.*repair"):
        WriterLease(repo.store, "main").acquire()
    assert repo.index().fences["main"] == schema.MAX_INT  # still readable
    repo.store.put("versions.json", b"garbled")
    planted(repo.store, fence=schema.MAX_INT, released=True)
    assert repo.repair().fences["main"] == schema.MAX_INT  # a readable index, not past it
    assert repo.index().fences["main"] == schema.MAX_INT
