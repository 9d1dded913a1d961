"""The store layer, run the same way against memory://, file://, moto and SeaweedFS."""

from __future__ import annotations

import threading
import time

import pytest

from cloudckpt.errors import CheckpointNotFound, PreconditionFailed, StoreError, SweepExpired
from cloudckpt.store import RetryPolicy, Store, StoreOptions


@pytest.fixture
def store(backend) -> Store:
    uri, opts = backend
    return Store(uri, opts)


def test_put_get_range_list_delete(store: Store) -> None:
    store.put("a/b/one", b"hello world")
    store.put("a/two", memoryview(b"xyz"))
    assert store.get("a/b/one") == b"hello world"
    assert store.get_range("a/b/one", 6, 11) == b"world"
    assert store.stat("a/two") is not None and store.stat("a/three") is None
    assert store.stat("a/b/one").size == 11
    assert store.list_keys("a") == ["a/b/one", "a/two"]
    store.delete(["a/two"])
    assert store.list_keys("a") == ["a/b/one"]
    assert store.list_keys("nothing-here") == []


def test_missing_object_is_checkpoint_not_found_naming_the_url(store: Store) -> None:
    with pytest.raises(CheckpointNotFound, match="missing-key"):
        store.get("missing-key")
    assert store.read_versioned("missing-key") is None


def test_put_if_absent_writes_once(store: Store) -> None:
    assert store.put_if_absent("m.json", b"first")
    assert not store.put_if_absent("m.json", b"second")
    assert store.get("m.json") == b"first"


def test_put_if_match_is_compare_and_swap(store: Store) -> None:
    etag0 = store.put_if_match("v.json", b"v0", None)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("v.json", b"v0-again", None)
    data, etag = store.read_versioned("v.json")
    assert data == b"v0" and etag == etag0
    etag1 = store.put_if_match("v.json", b"v1", etag)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("v.json", b"stale", etag)
    assert store.read_versioned("v.json") == (b"v1", etag1)


def test_racing_swaps_exactly_one_wins(store: Store) -> None:
    store.put_if_match("race.json", b"start", None)
    _, etag = store.read_versioned("race.json")
    results: list[str] = []
    barrier = threading.Barrier(4)

    def contender(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            store.put_if_match("race.json", f"writer-{i}".encode(), etag)
            results.append("won")
        except PreconditionFailed:
            results.append("lost")

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["lost", "lost", "lost", "won"]


def test_unreachable_endpoint_fails_with_store_error_after_bounded_retries() -> None:
    # A loopback port nobody listens on: connection refused, retried, then a clear error.
    from cloudckpt.testing.local_s3 import free_port

    opts = StoreOptions(
        connect_timeout=1, read_timeout=1, retry=RetryPolicy(attempts=3, initial_backoff=0.01)
    )
    store = Store(
        "s3://bucket/x",
        {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"},
        opts,
    )
    with pytest.raises(StoreError, match=r"s3://bucket/x/obj") as info:
        store.get("obj")
    assert "nothing is listening at the endpoint" in str(info.value)


def test_large_objects_go_up_in_multipart(seaweedfs) -> None:
    from conftest import S3Requests

    store = Store(seaweedfs.fresh_uri("multipart"), seaweedfs.storage_options())
    requests = S3Requests(store)
    data = bytes(range(256)) * (101 * 1024 * 4)  # 101 MiB
    store.put("huge", data)
    assert requests.count("POST", "huge") >= 2  # create and complete the multipart upload
    assert requests.count("PUT", "huge") >= 2  # its parts
    assert store.stat("huge").size == len(data)
    assert store.get_range("huge", len(data) - 5, len(data)) == data[-5:]


def test_a_guarded_delete_checks_before_every_object(tmp_path) -> None:
    """A garbage collection frozen mid-batch must not go on unlinking when it resumes."""
    store = Store(f"file://{tmp_path}/s")
    keys = [f"blobs/aa/{n}" for n in range(3)]
    for key in keys:
        store.put(key, b"x")
    calls = []

    def guard() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise SweepExpired("stopped")

    with pytest.raises(SweepExpired):
        store.delete(keys, guard=guard)
    assert store.list_keys("blobs") == keys[1:]  # one deleted, then the guard stopped it
    store.delete([*keys, "blobs/aa/never-was"])  # what is gone already is no error
    assert store.list_keys("blobs") == []


def test_a_frozen_lock_holder_makes_local_swaps_fail_clearly_not_hang(tmp_path) -> None:
    import fcntl

    from cloudckpt.store.local import LocalConditional, LockTimeout

    path = str(tmp_path / "versions.json")
    cond = LocalConditional(lock_timeout=0.3)
    etag = cond.replace(path, b"1", None)
    with open(path + ".lock", "a+b") as held:  # another open file: as another process
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(LockTimeout, match="held for over 0s"):
            cond.replace(path, b"2", etag)
        assert time.monotonic() - start < 5
    assert cond.replace(path, b"2", etag)


def test_age_is_measured_by_the_stores_clock(backend) -> None:
    store = Store(*backend)
    assert store.age("nothing-here") is None
    store.put("x", b"1")
    assert 0 <= store.age("x") < 30  # type: ignore[operator]


def test_a_pipe_or_directory_where_an_object_should_be_is_refused_not_waited_on(
    tmp_path,
) -> None:
    """file://: a named pipe would block a read forever; a directory is no object."""
    import os

    from cloudckpt.errors import CorruptCheckpoint

    store = Store(f"file://{tmp_path}/repo")
    store.put("x/ok", b"1")
    os.mkfifo(tmp_path / "repo" / "x" / "pipe")
    (tmp_path / "repo" / "x" / "dir").mkdir()
    for key in ("x/pipe", "x/dir"):
        with pytest.raises(CorruptCheckpoint, match="not a regular file"):
            store.get(key)
        with pytest.raises(CorruptCheckpoint, match="not a regular file"):
            store.read_versioned(key)


def test_a_symbolic_link_inside_the_root_does_not_lead_outside(tmp_path) -> None:
    import os

    from cloudckpt.errors import CorruptCheckpoint

    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "repo").mkdir()
    os.symlink(outside, tmp_path / "repo" / "leases")
    store = Store(f"file://{tmp_path}/repo")
    with pytest.raises(CorruptCheckpoint, match="symbolic link"):
        store.put("leases/main.json", b"{}")
    with pytest.raises(CorruptCheckpoint, match="symbolic link"):
        store.put_if_absent("leases/main.json", b"{}")
    assert list(outside.iterdir()) == []
    os.symlink(tmp_path / "repo", tmp_path / "alias")  # the root itself may be a link
    Store(f"file://{tmp_path}/alias").put("blobs/x", b"1")


def test_a_lock_file_planted_as_a_link_creates_nothing_outside(tmp_path) -> None:
    """The compare-and-swap's ``.lock`` next to versions.json is opened without following
    a link (one planted there made the lock create a file outside the root)."""
    import os

    from cloudckpt.errors import CorruptCheckpoint

    (tmp_path / "repo").mkdir()
    target = tmp_path / "outside-file"
    os.symlink(target, tmp_path / "repo" / "versions.json.lock")
    store = Store(f"file://{tmp_path}/repo")
    with pytest.raises(CorruptCheckpoint, match="symbolic link"):
        store.put_if_match("versions.json", b"{}", None)
    assert not target.exists()
