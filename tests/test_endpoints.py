"""A dying endpoint is reported promptly: the first blob that fails for good stops a save
or load, the error names the endpoint, and one call's time is bounded by its deadline."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
import torch
from tcp_proxy import REFUSE, SILENT, DyingEndpoint

from cloudckpt import Repo, RepoOptions, RetryPolicy, StoreOptions, TransferOptions
from cloudckpt.blobs.batch import Batch, ByteBudget
from cloudckpt.errors import CorruptCheckpoint, StoreError
from cloudckpt.store import Store
from cloudckpt.store.retry import Abandoned, abandon_when
from cloudckpt.testing.local_s3 import ACCESS_KEY, SECRET_KEY

BLOBS = 200
WORKERS = 8
POLICY = RetryPolicy(attempts=4, total_seconds=3.0, initial_backoff=0.05, max_backoff=0.5)
#: Short timeouts, so that a silent endpoint costs seconds, not a minute.
SHORT = StoreOptions(connect_timeout=1.0, read_timeout=1.0, retry=POLICY)
CREDENTIALS = {"key": ACCESS_KEY, "secret": SECRET_KEY}


def options(fast_path: bool = True) -> RepoOptions:
    store = StoreOptions(SHORT.connect_timeout, SHORT.read_timeout, POLICY, fast_path=fast_path)
    return RepoOptions(transfer=TransferOptions(chunk_size=4096, workers=WORKERS), store=store)


def state() -> dict[str, Any]:
    return {"w": torch.randn(BLOBS * 1024)}  # 200 chunks of 4 KiB


@pytest.mark.parametrize(
    "mode, phase, fast_path",
    [
        (REFUSE, "save", True),
        (REFUSE, "load", True),
        (SILENT, "save", True),
        (SILENT, "load", True),
        (SILENT, "load", False),
    ],
    ids=["refuse-save", "refuse-load", "silent-save", "silent-load", "silent-load-s3fs"],
)
def test_a_dying_endpoint_stops_a_200_blob_transfer_within_one_call_budget(
    moto_server, mode: str, phase: str, fast_path: bool
) -> None:
    uri, opts, data = moto_server.fresh_uri("dying"), options(fast_path), state()
    if phase == "load":
        Repo(uri, moto_server.storage_options(), options=opts).commit(data)
    pattern = ("^PUT " if phase == "save" else "^GET ") + ".*/blobs/"
    with DyingEndpoint(moto_server.endpoint, mode, pattern, after=BLOBS // 4) as proxy:
        repo = Repo(uri, proxy.storage_options(CREDENTIALS), options=opts)
        with pytest.raises(StoreError) as info:
            if phase == "save":
                repo.commit(data)
            else:
                repo.load()
        failed_at = time.monotonic()
        assert proxy.switched_at is not None, "the endpoint never turned"
        assert proxy.matched == BLOBS // 4  # blobs went through before it did
        assert failed_at - proxy.switched_at < POLICY.total_seconds + 5
        assert f"127.0.0.1:{proxy.port}" in str(info.value)
        assert SECRET_KEY not in str(info.value)
        if mode == SILENT:  # requests it saw: the blobs in flight and their retries only
            assert proxy.after_switch <= WORKERS * POLICY.attempts + 4, proxy.after_switch
            seen = proxy.after_switch
            time.sleep(1.5)  # the abandoned calls start no new attempt
            assert proxy.after_switch == seen


def test_the_defaults_report_a_silent_endpoint_within_about_a_minute() -> None:
    options = StoreOptions()
    policy = options.retry
    assert options.connect_timeout + options.read_timeout < policy.total_seconds <= 60
    assert policy.total_seconds // options.read_timeout >= 2  # a stall is retried


# -- one call's deadline ---------------------------------------------------------------
def test_a_retry_running_past_the_deadline_is_abandoned() -> None:
    release = threading.Event()
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise ConnectionError("reset")
        release.wait(30)  # a retry that never answers
        return "late"

    policy = RetryPolicy(attempts=5, total_seconds=1.0, initial_backoff=0.01, max_backoff=0.01)
    t0 = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="1 s budget"):
            policy.call(flaky, "get x", watch=True)
        assert time.monotonic() - t0 < 1.5
        assert len(calls) == 2
    finally:
        release.set()


def test_no_retry_starts_once_the_deadline_has_passed() -> None:
    calls = []

    def slow_failure() -> None:
        calls.append(1)
        time.sleep(0.4)
        raise ConnectionError("reset")

    policy = RetryPolicy(attempts=10, total_seconds=1.0, initial_backoff=0.01, max_backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        policy.call(slow_failure, "get x")
    assert time.monotonic() - t0 < 1.5
    assert len(calls) == 3


def test_a_call_gives_up_when_its_transfer_is_abandoned() -> None:
    stop = threading.Event()
    calls = []

    def failing() -> None:
        calls.append(1)
        raise ConnectionError("reset")

    policy = RetryPolicy(attempts=8, total_seconds=60, initial_backoff=10, max_backoff=10)
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with abandon_when(stop), pytest.raises(Abandoned):
        policy.call(failing, "get x")  # backoffs of up to 10 s, cut short by the stop
    assert time.monotonic() - t0 < 2


SECRETS = {"key": "AKIDSECRETID", "secret": "hush-hush-secret"}


def test_the_store_error_names_the_endpoint_and_no_credential() -> None:
    with socket.socket() as s:  # a port that refuses: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        for fast_path in (True, False):
            store = Store(
                "s3://bucket/run",
                {"endpoint_url": f"http://127.0.0.1:{port}", **SECRETS},
                StoreOptions(1, 1, RetryPolicy(2, 5, 0.01, 0.01), fast_path=fast_path),
            )
            with pytest.raises(StoreError) as info:
                store.get("obj")
            message = str(info.value)
            assert f"(endpoint http://127.0.0.1:{port})" in message
            assert "hush-hush-secret" not in message and "AKIDSECRETID" not in message


# -- the fail-fast batch ---------------------------------------------------------------
def test_the_first_failure_stops_submission_and_raises_without_waiting_for_calls() -> None:
    started: list[int] = []
    stuck = threading.Event()

    def job(n: int) -> int:
        started.append(n)
        if n == 3:
            raise StoreError("blob 3 failed for good")
        if n < 3:
            stuck.wait(30)  # calls in flight that never answer
        return n

    t0 = time.monotonic()
    try:
        with pytest.raises(StoreError, match="blob 3"), Batch(4, "test") as batch:
            for n in range(1000):
                if not batch.submit(n, 0, job, n):
                    break
                time.sleep(0.001)
            batch.results()
        assert time.monotonic() - t0 < 5
        assert len(started) < 50
    finally:
        stuck.set()


def test_a_failure_wakes_a_submitter_waiting_for_memory() -> None:
    stuck = threading.Event()

    def job(n: int) -> None:
        if n == 1:
            time.sleep(0.2)
            raise StoreError("failed")
        stuck.wait(30)

    try:
        with Batch(4, "test", max_bytes=100) as batch:
            assert batch.submit(0, 60, job, 0)
            assert batch.submit(1, 30, job, 1)
            t0 = time.monotonic()
            assert not batch.submit(2, 60, job, 2)  # waited for room; woken by the failure
            assert time.monotonic() - t0 < 2
            with pytest.raises(StoreError):
                batch.results()
    finally:
        stuck.set()


def test_no_job_touches_the_arrays_after_the_batch_failed() -> None:
    downloading = threading.Event()
    inside = threading.Event()
    touched: list[int] = []

    def job(n: int, batch: Batch) -> None:
        if n == 0:
            downloading.wait(30)  # still downloading when blob 1 fails
            with batch.gate.inside():
                touched.append(n)
        else:
            inside.wait(5)
            raise CorruptCheckpoint("blob 1 is corrupt")

    with pytest.raises(CorruptCheckpoint), Batch(2, "test") as batch:
        batch.submit(0, 0, job, 0, batch)
        batch.submit(1, 0, job, 1, batch)
        inside.set()
        batch.results()
    downloading.set()
    time.sleep(0.2)
    assert touched == []


def test_tolerated_failures_are_collected_and_others_stop() -> None:
    def job(n: int) -> int:
        if n % 3 == 0:
            raise CorruptCheckpoint(f"blob {n}")
        return n

    def corrupt_only(e: BaseException) -> bool:
        return isinstance(e, CorruptCheckpoint)

    with Batch(4, "test", tolerate=corrupt_only) as batch:
        for n in range(10):
            batch.submit(n, 0, job, n)
        out = batch.results()
    assert [type(out[n]).__name__ for n in (0, 3, 6, 9)] == ["CorruptCheckpoint"] * 4
    assert [out[n] for n in (1, 2, 4)] == [1, 2, 4]

    def job2(n: int) -> int:
        if n == 5:
            raise StoreError("down")
        return job(n)

    with pytest.raises(StoreError), Batch(4, "test", tolerate=corrupt_only) as batch:
        for n in range(10):
            batch.submit(n, 0, job2, n)
        batch.results()


def test_a_closed_budget_grants_nothing_and_wakes_its_waiters() -> None:
    budget = ByteBudget(10)
    assert budget.acquire(8)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(budget.acquire(8)))
    waiter.start()
    time.sleep(0.1)
    budget.close()
    waiter.join(5)
    assert woke == [False] and not budget.acquire(1)


def test_verify_collects_corrupt_blobs_but_stops_on_a_store_error(tmp_path) -> None:
    repo = Repo(f"file://{tmp_path}/repo", options=options())
    version = repo.commit(state())
    blobs = sorted(repo.store.list_keys("blobs/"))
    for key in blobs[:3]:
        repo.store.put(key, b"garbage")
    report = repo.verify(version.id)
    assert sorted(report.problems) == blobs[:3]
    broken = Repo(f"file://{tmp_path}/repo", options=options())
    calls = []
    real = broken.store.get_buffer

    def failing(key: str, limit: int | None = None) -> Any:
        calls.append(key)
        if len(calls) == 10:
            raise StoreError("the store is down")
        return real(key, limit)

    broken.store.get_buffer = failing  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="down"):
        broken.verify(version.id)
    assert len(calls) < 10 + 2 * WORKERS
