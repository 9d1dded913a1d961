"""Retries and timeouts through the real S3 client stack, against a scripted HTTP server
on 127.0.0.1 that answers every request with the same failure."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from http_servers import serving

from cloudckpt.errors import CheckpointNotFound, StoreError
from cloudckpt.store import RetryPolicy, Store, StoreOptions

ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
}


class ScriptedS3(ThreadingHTTPServer):
    """Answers every request with ``status`` (an S3 error document), or stalls."""

    daemon_threads = True

    def __init__(self, status: int | None, stall: float = 0.0) -> None:
        self.status, self.stall, self.requests = status, stall, 0
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedS3

    def _answer(self) -> None:
        self.server.requests += 1
        # The body is never needed; with "Expect: 100-continue" it is not even sent.
        length = int(self.headers.get("Content-Length") or 0)
        if length and self.headers.get("Expect", "").lower() != "100-continue":
            self.rfile.read(length)
        if self.server.stall:
            time.sleep(self.server.stall)
        status = self.server.status or 500
        code, message = ERRORS[status]
        body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


def serve(status: int | None, stall: float = 0.0) -> AbstractContextManager[ScriptedS3]:
    return serving(ScriptedS3(status, stall))


@pytest.fixture(params=[True, False], ids=["obstore", "s3fs"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Each test runs through both S3 clients: blob bytes (obstore) and the rest (s3fs)."""
    return request.param


def store_for(
    server: ScriptedS3, fast_path: bool, attempts: int = 4, read_timeout: float = 5
) -> Store:
    opts = StoreOptions(
        connect_timeout=2,
        read_timeout=read_timeout,
        retry=RetryPolicy(attempts=attempts, initial_backoff=0.01, max_backoff=0.05),
        fast_path=fast_path,
    )
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    store = Store("s3://bucket/run", {"endpoint_url": endpoint, "key": "k", "secret": "s"}, opts)
    assert (store.backend.transport is not None) == fast_path
    return store


@pytest.mark.parametrize("status", [503, 500])
def test_throttling_and_server_errors_are_retried_up_to_the_budget(
    status: int, fast_path: bool
) -> None:
    with serve(status) as server:
        store = store_for(server, fast_path, attempts=4)
        with pytest.raises(StoreError, match="retry later") as info:
            store.put("obj", b"data")
        assert server.requests == 4
        assert "s3://bucket/run/obj" in str(info.value)


def test_access_denied_is_not_retried_and_says_what_to_check(fast_path: bool) -> None:
    with serve(403) as server:
        with pytest.raises(StoreError, match=r"access denied.*credentials"):
            store_for(server, fast_path).get("obj")
        assert server.requests == 1


def test_missing_object_is_not_retried(fast_path: bool) -> None:
    with serve(404) as server:
        with pytest.raises(CheckpointNotFound, match="s3://bucket/run/obj"):
            store_for(server, fast_path).get("obj")
        assert server.requests == 1
        assert store_for(server, fast_path).stat("obj") is None
        assert server.requests == (2 if fast_path else 3)  # s3fs lists after the HEAD


def test_a_stalled_response_times_out_and_is_retried(fast_path: bool) -> None:
    with serve(503, stall=30.0) as server:
        store = store_for(server, fast_path, attempts=2, read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(StoreError):
            store.get("obj")
        assert time.monotonic() - t0 < 20  # two 0.5 s timeouts, far from two 30 s stalls
        assert server.requests == 2
