"""The blob cache (blobs/cache.py) against a real S3 server (SeaweedFS): loads after a
restart fetch only what the cache lacks, damaged cache files are never trusted, the cache
may vanish at any time or be shared by processes, stays under its size bound, and
``Repo.verify`` checks the store's copies, not the cache's."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from assertions import assert_state_equal

from cloudckpt import Repo, RepoOptions, TransferOptions, codec
from cloudckpt.blobs import blob_key, iter_chunks
from cloudckpt.blobs.cache import BlobCache, CacheOptions
from cloudckpt.errors import StoreError
from cloudckpt.versions import Version

CHILD = str(Path(__file__).with_name("child_cache.py"))


@pytest.fixture
def s3(seaweedfs: Any) -> tuple[str, dict[str, Any]]:
    return seaweedfs.fresh_uri("cache"), seaweedfs.storage_options()


#: Small chunks: many blobs per state.
CHUNKED = TransferOptions(chunk_size=32 * 1024, workers=4)


def options(cache_dir: Any, max_bytes: int = 1 << 30) -> RepoOptions:
    """Small chunks, a cache at ``cache_dir``."""
    return RepoOptions(transfer=CHUNKED, cache=CacheOptions(str(cache_dir), max_bytes))


def training_state(seed: int = 0) -> dict[str, Any]:
    """A real model and its Adam state after two steps: 18 chunk blobs of 32 KiB and a
    pack of the small tensors."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(torch.randn(8, 128)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2}


def digests(repo: Repo, ref: str = "main") -> set[str]:
    doc = repo.manifest(repo.resolve(ref))
    return {c.digest for e in doc.tensors for c in iter_chunks(e)}


def cached_files(cache_dir: Any) -> dict[str, Path]:
    """digest -> file of every blob held (not temporary files)."""
    root = Path(cache_dir)
    if not root.is_dir():
        return {}
    return {p.name: p for p in root.glob("??/*") if p.is_file() and not p.name.startswith(".")}


def saved(repo: Repo, state: Any) -> Version:
    """Commit ``state`` (step 2), and wait for the cache's background writes."""
    version = repo.commit(state, step=2)
    assert repo.cache is not None and repo.cache.flush(60)
    return version


def blob_gets(repo: Repo) -> list[str]:
    """Record the blob keys ``repo`` reads from its store from now on."""
    seen: list[str] = []
    original = repo.store.get_buffer

    def get_buffer(key: str, limit: int | None = None) -> Any:
        if key.startswith("blobs/"):
            seen.append(key)
        return original(key, limit)

    repo.store.get_buffer = get_buffer  # type: ignore[method-assign]
    return seen


def test_a_restarted_load_fetches_only_what_the_cache_lacks(s3, tmp_path) -> None:
    uri, opts = s3
    cache_dir = tmp_path / "cache"
    want = training_state()
    saved(Repo(uri, opts, options=options(cache_dir)), want)
    held = cached_files(cache_dir)
    every = digests(Repo(uri, opts))
    assert set(held) == every, "a save keeps the raw bytes of every blob it writes"
    dropped = sorted(every)[::3]
    for digest in dropped:
        held[digest].unlink()

    repo = Repo(uri, opts, options=options(cache_dir))  # a restart: a new Repo, same cache
    gets = blob_gets(repo)
    assert_state_equal(want, repo.load())
    assert sorted(gets) == sorted(blob_key(d) for d in dropped)
    assert repo.last_stats.transferred_blobs == len(dropped)
    assert repo.last_stats.reused_blobs == len(every) - len(dropped)
    assert repo.cache.hits == len(every) - len(dropped)
    assert set(cached_files(cache_dir)) == every, "what was fetched is kept again"

    again = Repo(uri, opts, options=options(cache_dir))
    gets = blob_gets(again)
    assert_state_equal(want, again.load())
    assert gets == [] and again.last_stats.transferred_blobs == 0
    assert again.cache.hits == len(every)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _grow(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0" * 16)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_flip, _truncate, _grow, _empty], ids=lambda f: f.__name__)
def test_a_damaged_cache_file_is_dropped_and_read_from_the_store(s3, tmp_path, damage) -> None:
    uri, opts = s3
    cache_dir = tmp_path / "cache"
    want = training_state(1)
    saved(Repo(uri, opts, options=options(cache_dir)), want)
    held = cached_files(cache_dir)
    victim = max(held, key=lambda d: held[d].stat().st_size)  # the largest: a model weight
    damage(held[victim])

    repo = Repo(uri, opts, options=options(cache_dir))
    gets = blob_gets(repo)
    assert_state_equal(want, repo.load())
    assert gets == [blob_key(victim)]
    assert repo.last_stats.transferred_blobs == 1
    assert repo.cache.hits == len(held) - 1
    fixed = np.fromfile(held[victim], dtype=np.uint8)
    assert codec.content_hash(fixed) == victim, "the good copy replaced the damaged one"


def small_tensors(seed: int) -> dict[str, Any]:
    """Tensors under ``pack_below``: their blobs are packs, copies the save owns."""
    g = torch.Generator().manual_seed(seed)
    return {f"b{i}": torch.randn(1000, generator=g) for i in range(8)}


def blocked_puts(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every cache write waits for the returned event."""
    release = threading.Event()
    put = BlobCache.put

    def blocked(self: BlobCache, digest: str, raw: Any) -> None:
        assert release.wait(60)
        put(self, digest, raw)

    monkeypatch.setattr(BlobCache, "put", blocked)
    return release


def test_a_save_does_not_wait_for_the_cache_to_keep_the_copies_it_owns(
    tmp_path, monkeypatch
) -> None:
    cache_dir = tmp_path / "cache"
    repo = Repo(f"memory://cache/{tmp_path.name}", options=options(cache_dir))
    release = blocked_puts(monkeypatch)
    repo.commit(small_tensors(0))  # returns, every cache write still blocked
    assert cached_files(cache_dir) == {} and not repo.cache.flush(0.01)
    release.set()
    assert repo.cache.flush(60)
    assert set(cached_files(cache_dir)) == digests(repo)


def test_a_save_keeps_views_of_its_arrays_before_it_returns(tmp_path) -> None:
    """A chunk read in place from the caller's arrays is written before the save returns
    (it may change once it has): no flush needed."""
    cache_dir = tmp_path / "cache"
    repo = Repo(f"memory://cache/{tmp_path.name}", options=options(cache_dir))
    state = {"w": torch.randn(256 * 1024)}  # 1 MiB: chunks of the tensor itself
    repo.commit(state)
    assert set(cached_files(cache_dir)) == digests(repo)


def test_a_failed_save_keeps_nothing_in_the_cache(tmp_path, monkeypatch) -> None:
    """Blobs go to the cache once stored: a save whose uploads fail writes none."""
    cache_dir = tmp_path / "cache"
    repo = Repo(f"memory://cache/{tmp_path.name}", options=options(cache_dir))
    put = repo.store.put

    def failing(key: str, data: Any) -> None:
        if key.startswith("blobs/"):
            raise StoreError(f"put {key} failed")
        put(key, data)

    monkeypatch.setattr(repo.store, "put", failing)
    with pytest.raises(StoreError):
        repo.commit({**training_state(6), **small_tensors(6)})
    assert repo.cache.flush(60)
    assert cached_files(cache_dir) == {}


def test_past_max_pending_bytes_the_caller_writes_the_blob_itself(tmp_path, monkeypatch) -> None:
    """The background writer's queue is bounded: past it, put_later writes at once (the
    caller waits for the cache's disk; memory stays bounded, the cache complete)."""
    cache = BlobCache(CacheOptions(str(tmp_path / "c"), max_pending_bytes=1000))
    release = blocked_puts(monkeypatch)
    raws = [np.full(600, n, dtype=np.uint8) for n in range(2)]
    first, second = (codec.content_hash(r) for r in raws)
    cache.put_later(first, raws[0])  # queued: returns at once
    caller = threading.Thread(target=cache.put_later, args=(second, raws[1]))
    caller.start()
    caller.join(0.3)
    assert caller.is_alive(), "over max_pending_bytes: the caller writes, and waits"
    release.set()
    caller.join(60)
    assert cache.flush(60)
    assert set(cached_files(cache.root)) == {first, second}


def test_a_child_forked_mid_queue_writes_what_was_queued(tmp_path, monkeypatch) -> None:
    """fork() copies the queue but not the writer thread (busy with the first blob in
    the parent): the child's flush must write the rest itself, not wait forever."""
    from processes import wait_forked

    cache = BlobCache(CacheOptions(str(tmp_path / "c")))
    release = blocked_puts(monkeypatch)
    raws = [np.full(4096, n, dtype=np.uint8) for n in range(3)]
    digests = [codec.content_hash(r) for r in raws]
    for digest, raw in zip(digests, raws, strict=True):
        cache.put_later(digest, raw)
    time.sleep(0.2)  # the parent's writer has taken the first and waits in put
    pid = os.fork()
    if pid == 0:  # exit 0 only if the child's flush keeps what was still queued
        try:
            release.set()
            kept = cache.flush(20) and set(digests[1:]) <= set(cached_files(cache.root))
            os._exit(0 if kept else 1)
        finally:
            os._exit(2)
    code, in_time = wait_forked(pid, timeout=60)
    release.set()
    assert in_time and code == 0, (code, in_time)
    assert cache.flush(60)
    assert set(cached_files(cache.root)) == set(digests)


#: A child that keeps one 16 MiB blob in the cache at argv[1], each write of 1 MiB taking
#: 0.1 s; by ``put`` or ``put_later`` (argv[2]), then it exits.
SLOW_WRITER = """
import os, sys, time
import numpy as np
from cloudckpt import codec
from cloudckpt.blobs.cache import BlobCache, CacheOptions
write = os.write
def slow(fd, data):
    time.sleep(0.1)
    return write(fd, memoryview(data)[: 1 << 20])
os.write = slow
raw = np.arange(2 << 20, dtype=np.uint64).view(np.uint8)
cache = BlobCache(CacheOptions(sys.argv[1]))
getattr(cache, sys.argv[2])(codec.content_hash(raw), raw)
print(codec.content_hash(raw), flush=True)
"""


def slow_writer(cache_dir: Path, how: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(cache_dir), how],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_writer_killed_mid_write_leaves_nothing_that_reads_as_valid(tmp_path) -> None:
    cache_dir = tmp_path / "cache"
    proc = slow_writer(cache_dir, "put")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until part of the blob is written
        with contextlib.suppress(FileNotFoundError):  # renamed: too late, the test fails
            if any(t.stat().st_size for t in cache_dir.glob("??/.tmp-*")):
                break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    (tmp,) = cache_dir.glob("??/.tmp-*")
    assert 0 < tmp.stat().st_size < 16 << 20, "killed mid-write"
    assert cached_files(cache_dir) == {}, "nothing named by a hash"
    raw = np.arange(2 << 20, dtype=np.uint64).view(np.uint8)
    cache = BlobCache(CacheOptions(str(cache_dir)))
    digest = codec.content_hash(raw)
    assert not cache.has(digest, raw.size)
    assert not cache.read_into(digest, np.empty(raw.size, dtype=np.uint8))


def test_what_the_background_writer_holds_is_kept_at_a_clean_exit(tmp_path) -> None:
    cache_dir = tmp_path / "cache"
    proc = slow_writer(cache_dir, "put_later")  # exits as soon as it is queued
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    (path,) = cached_files(cache_dir).values()
    assert path.name == out.strip()
    assert codec.content_hash(np.fromfile(path, dtype=np.uint8)) == path.name
    assert not list(cache_dir.glob("??/.tmp-*"))


def test_flipped_byte_is_a_miss_and_the_file_is_removed(tmp_path) -> None:
    cache = BlobCache(CacheOptions(str(tmp_path / "c")))
    raw = np.arange(4096, dtype=np.uint8)
    digest = codec.content_hash(raw)
    cache.put(digest, raw)
    _flip(Path(cache.path(digest)))
    out = np.empty(4096, dtype=np.uint8)
    assert not cache.read_into(digest, out)
    assert not os.path.exists(cache.path(digest)) and cache.misses == 1
    cache.put(digest, raw)
    assert cache.read_into(digest, out) and bytes(out) == bytes(raw) and cache.hits == 1


def test_deleting_the_cache_directory_during_loads_never_gives_wrong_data(s3, tmp_path) -> None:
    uri, opts = s3
    cache_dir = tmp_path / "cache"
    states = [training_state(10), training_state(11)]
    writer = Repo(uri, opts, options=options(cache_dir))
    ids = [writer.commit(s, step=n).id for n, s in enumerate(states)]
    stop = threading.Event()
    wiped = [0]  # rmtree calls so far
    fetched = 0  # blobs the loads read from the store

    def wipe() -> None:
        for n in range(2000):  # bounded; stopped as soon as the loads are done
            if stop.wait(0.3 if n % 3 == 0 else 0.01):  # now and then, the cache survives
                return
            shutil.rmtree(cache_dir, ignore_errors=True)
            wiped[0] += 1

    thread = threading.Thread(target=wipe, daemon=True)
    thread.start()
    repo = Repo(uri, opts, options=options(cache_dir))
    try:
        for n in range(40):  # until the wipes met loads on both paths, bounded
            k = n % 2
            assert_state_equal(states[k], repo.load(ids[k]))
            fetched += repo.last_stats.transferred_blobs
            if n >= 8 and wiped[0] > 5 and repo.cache.hits > 0 and fetched > 0:
                break
    finally:
        stop.set()
        thread.join(timeout=30)
    assert wiped[0] > 5
    assert repo.cache.hits > 0 and fetched > 0, "both paths were taken"
    for digest, path in cached_files(cache_dir).items():  # what survived is whole
        assert codec.content_hash(np.fromfile(path, dtype=np.uint8)) == digest


def test_two_processes_sharing_a_cache_load_and_save_exact_states(seaweedfs, tmp_path) -> None:
    uri = seaweedfs.fresh_uri("cache-shared")
    cache_dir = tmp_path / "shared"
    env = {**os.environ, **seaweedfs.env(), "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, CHILD, uri, str(cache_dir), str(seed), "4"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (1, 2)
    ]
    outs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        outs.append(out)
        assert proc.returncode == 0, out
        assert out.strip().splitlines()[-1].startswith("ok "), out
    assert not list(Path(cache_dir).glob("??/.tmp-*")), "a finished writer leaves no temporary"
    held = cached_files(cache_dir)
    assert held
    for digest, path in held.items():
        assert codec.content_hash(np.fromfile(path, dtype=np.uint8)) == digest
    assert sum(int(out.split()[-1]) for out in outs) > 0, "the loads were served by the cache"


def _fill(cache: BlobCache, n: int, size: int) -> str:
    raw = np.full(size, n, dtype=np.uint8)
    digest = codec.content_hash(raw)
    cache.put(digest, raw)
    time.sleep(0.02)  # distinct modification times
    return digest


def test_lru_eviction_keeps_under_max_bytes_and_drops_the_least_recently_used(tmp_path) -> None:
    cache = BlobCache(CacheOptions(str(tmp_path / "lru"), max_bytes=3000))
    a, b, c = (_fill(cache, n, 1000) for n in range(3))
    assert set(cached_files(cache.root)) == {a, b, c}
    out = np.empty(1000, dtype=np.uint8)
    assert cache.read_into(a, out)  # a is now more recent than b and c
    time.sleep(0.02)
    d = _fill(cache, 3, 1000)
    assert set(cached_files(cache.root)) == {a, c, d}, "b was the least recently used"
    assert cache.read_into(c, out)
    time.sleep(0.02)
    e = _fill(cache, 4, 1500)  # over by 1500: the two least recently used go (a, d)
    assert set(cached_files(cache.root)) == {c, e}
    total = sum(p.stat().st_size for p in cached_files(cache.root).values())
    assert total <= 3000


def test_caches_sharing_a_directory_keep_it_near_max_bytes(tmp_path) -> None:
    """Two sharers (as two processes: nothing shared in memory) each count only what
    they add themselves; each recounts the directory every eighth of max_bytes it adds,
    so neither lets it grow past the bound by more than that."""
    root = str(tmp_path / "shared")
    sharers = [BlobCache(CacheOptions(root, max_bytes=8000)) for _ in range(2)]
    for n in range(40):
        raw = np.full(500, n, dtype=np.uint8)
        sharers[n % 2].put(codec.content_hash(raw), raw)
        total = sum(p.stat().st_size for p in cached_files(root).values())
        assert total <= 8000 + 2 * 8000 // 8, f"after {n + 1} puts"


def test_loads_keep_the_cache_directory_under_max_bytes(s3, tmp_path) -> None:
    uri, opts = s3
    want = training_state(3)
    Repo(uri, opts, options=RepoOptions(transfer=CHUNKED)).commit(want, step=2)
    limit = 200 * 1024  # a third of the state
    repo = Repo(uri, opts, options=options(tmp_path / "small", max_bytes=limit))
    for _ in range(2):
        assert_state_equal(want, repo.load())
        sizes = [p.stat().st_size for p in cached_files(tmp_path / "small").values()]
        assert sizes and sum(sizes) <= limit


def test_an_unwritable_cache_only_logs(s3, tmp_path, caplog) -> None:
    uri, opts = s3
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # no one, root included, can create under it
    want = training_state(4)
    caplog.set_level(logging.WARNING, logger="cloudckpt.cache")
    Repo(uri, opts, options=options(blocker / "cache")).commit(want, step=2)
    repo = Repo(uri, opts, options=options(blocker / "cache"))
    assert_state_equal(want, repo.load())
    assert repo.last_stats.transferred_blobs == len(digests(repo))
    assert "cache: cannot keep" in caplog.text
    # The cache path itself a file: the same.
    other = Repo(uri, opts, options=options(blocker))
    assert_state_equal(want, other.load())


def test_verify_reads_the_store_never_the_cache(s3, tmp_path) -> None:
    uri, opts = s3
    cache_dir = tmp_path / "cache"
    want = training_state(5)
    repo = Repo(uri, opts, options=options(cache_dir))
    version = saved(repo, want)
    held = cached_files(cache_dir)
    victim = max(held, key=lambda d: held[d].stat().st_size)
    key = blob_key(victim)
    stored = bytearray(repo.store.get(key))
    stored[len(stored) // 2] ^= 0x01
    repo.store.put(key, bytes(stored))  # the store's copy is bad, the cached one good
    good = held[victim].read_bytes()

    report = Repo(uri, opts, options=options(cache_dir)).verify(version.id)
    assert not report.ok
    assert key in report.problems
    assert held[victim].read_bytes() == good, "verify neither dropped nor replaced it"
    # A load through the cache still gets exact data (from the good cached copy).
    assert_state_equal(want, Repo(uri, opts, options=options(cache_dir)).load())


def test_a_symlinked_directory_in_the_cache_leads_nothing_outside_it(tmp_path: Path) -> None:
    import numpy as np

    from cloudckpt import BlobCache, CacheOptions, codec

    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    cache_dir.mkdir()
    outside.mkdir()
    for i in range(256):  # every blob directory planted as a link out of the cache
        (cache_dir / f"{i:02x}").symlink_to(outside)
    raw = np.arange(1000, dtype=np.uint8)
    digest = codec.content_hash(raw)
    (outside / digest).write_bytes(raw.tobytes())  # a "cached" copy outside
    cache = BlobCache(CacheOptions(str(cache_dir), max_bytes=1 << 20))
    cache.put(digest, np.arange(7, dtype=np.uint8).repeat(3))  # not written through it
    assert sorted(p.name for p in outside.iterdir()) == [digest]
    out = np.zeros(1000, dtype=np.uint8)
    assert not cache.read_into(digest, out)  # nor read through it


def test_an_eviction_racing_another_counts_what_the_other_removed(tmp_path, monkeypatch) -> None:
    """Two processes evict at once: files the other removed after this one's listing are
    gone all the same. Counting them as not freed made an eviction go on down to the
    newest files and leave the cache empty (seen under load in CI)."""
    cache = BlobCache(CacheOptions(tmp_path / "c", max_bytes=250))
    names = [f"{i:02x}" + "0" * 30 for i in range(6)]
    for age, digest in enumerate(names):  # written as another process left them
        path = Path(cache.path(digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(100))
        os.utime(path, (1000 + age, 1000 + age))  # oldest first
    real = BlobCache._remove
    calls: list[str] = []

    def remove(path: str) -> bool:
        if not calls:  # another evictor got to the three oldest first
            for digest in names[:3]:
                os.unlink(cache.path(digest))
        calls.append(path)
        return real(path)

    monkeypatch.setattr(BlobCache, "_remove", staticmethod(remove))
    cache.evict()
    left = sorted(p.name for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert left == sorted(names[4:])
