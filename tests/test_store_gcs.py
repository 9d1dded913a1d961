"""What is particular to Google Cloud Storage (``gs://``), on a real fake-gcs-server: the
server's preconditions, which errors are retried, what the messages say, and what a
failed large upload leaves."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import torch
from google.oauth2.credentials import Credentials
from http_servers import serving
from processes import exported_env, infra_script, reaped
from tcp_proxy import REFUSE, SILENT, DyingEndpoint

from cloudckpt import Repo
from cloudckpt.errors import CheckpointNotFound, PreconditionFailed, StoreError
from cloudckpt.store import Store, StoreOptions
from cloudckpt.store.gcs import GCSBackend
from cloudckpt.store.retry import RetryPolicy
from cloudckpt.testing.local_gcs import FakeGCS

SECRET = "ya29.cloudckpt-test-secret-token"


def secret_token() -> Credentials:
    """An OAuth access token, sent as is (no refresh, so no request but the store's)."""
    return Credentials(token=SECRET)


FAST_RETRY = StoreOptions(retry=RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05))
KiB = 1024


class Faulty(ThreadingHTTPServer):
    """A proxy to the GCS server that answers a request with ``fault(request)`` instead
    when it returns a status (0: drop the connection unanswered; -1: forward it, then
    drop the answer), and records every request (method, path, query).

    It answers the status check of a resumable upload session itself, as GCS documents
    it (308, ``Range`` of the bytes stored): fake-gcs-server takes one for the last part.
    """

    def __init__(self, upstream: str, fault: Callable[[str, str, dict[str, str]], int | None]):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.fault = fault
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.authorizations: list[str | None] = []
        #: upload session -> bytes stored (forwarded and answered)
        self.stored: dict[str, int] = {}
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, method: str) -> int:
        return sum(1 for m, _, _ in self.requests if m == method)


class _Handler(BaseHTTPRequestHandler):
    server: Faulty

    def log_message(self, *args: Any) -> None:
        pass

    def _any(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.server.requests.append((self.command, url.path, query))
        self.server.authorizations.append(self.headers.get("Authorization"))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = self.server.fault(self.command, url.path, query)
        content_range = self.headers.get("Content-Range", "")
        if self.command == "PUT" and content_range.startswith("bytes */"):
            stored = self.server.stored.get(self.path, 0)
            self.send_response(308)
            if stored:
                self.send_header("Range", f"bytes=0-{stored - 1}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if status == 0:
            self.close_connection = True
            return
        if status is not None and status > 0:
            payload = json.dumps({"error": {"code": status, "message": "injected"}}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        up = self.server.upstream
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        if self.command == "PUT" and content_range and resp.status in (200, 201, 308):
            self.server.stored[self.path] = int(content_range.split("-")[1].split("/")[0]) + 1
        if status == -1:
            self.close_connection = True
            return
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                # fake-gcs-server names its own address in resumable upload URLs
                self.send_header(name, value.replace(self.server.upstream.netloc, self.host))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    do_GET = do_POST = do_PUT = do_DELETE = _any


def first(n: int, status: int, method: str | None = None) -> Callable[..., int | None]:
    """A fault: the first ``n`` requests (of ``method``) answered with ``status``."""
    seen = [0]

    def fault(m: str, path: str, query: dict[str, str]) -> int | None:
        if method is not None and m != method:
            return None
        seen[0] += 1
        return status if seen[0] <= n else None

    return fault


@pytest.fixture
def faulty(fake_gcs: FakeGCS) -> Iterator[Callable[..., tuple[Faulty, Store]]]:
    """``faulty(fault, **storage_options)``: a proxy injecting ``fault`` and a store
    through it, on a fresh prefix of the session's bucket."""
    servers: list[Any] = []

    def make(fault: Callable[..., int | None], **opts: Any) -> tuple[Faulty, Store]:
        proxy = Faulty(fake_gcs.endpoint, fault)
        servers.append(serving(proxy))
        servers[-1].__enter__()
        options = {"endpoint_url": proxy.endpoint, "token": "anon", **opts}
        return proxy, Store(fake_gcs.fresh_uri("faulty"), options, FAST_RETRY)

    yield make
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture
def store(fake_gcs: FakeGCS) -> Store:
    return Store(fake_gcs.fresh_uri("gcs"), fake_gcs.storage_options())


def test_gs_uris_are_served_by_the_gcs_backend(fake_gcs: FakeGCS) -> None:
    for scheme in ("gs", "gcs"):
        backend = Store(f"{scheme}://bucket/run", fake_gcs.storage_options()).backend
        assert type(backend) is GCSBackend
        assert backend.root == "bucket/run"


def test_a_stale_generation_is_refused_by_the_server(store: Store, fake_gcs: FakeGCS) -> None:
    other = Store(store.uri, fake_gcs.storage_options())  # a second writer
    first = store.put_if_match("versions.json", b"v0", None)
    data, seen = store.read_versioned("versions.json")  # type: ignore[misc]
    assert (data, seen) == (b"v0", first)
    won = other.put_if_match("versions.json", b"theirs", seen)
    with pytest.raises(PreconditionFailed, match="changed under us"):
        store.put_if_match("versions.json", b"mine", seen)
    with pytest.raises(PreconditionFailed):
        store.put_if_match("versions.json", b"mine", None)  # not absent any more
    assert other.read_versioned("versions.json") == (b"theirs", won)


def test_the_etag_is_the_objects_generation(store: Store, fake_gcs: FakeGCS) -> None:
    """Writing the same bytes again is a new generation: a swap that raced a rewrite of
    identical content still fails (a content hash would let it through)."""
    first = store.put_if_match("versions.json", b"same", None)
    second = store.put_if_match("versions.json", b"same", first)
    assert second != first
    bucket, name = store.root.split("/", 1)
    url = f"{fake_gcs.endpoint}/storage/v1/b/{bucket}/o/" + urllib.parse.quote(
        f"{name}/versions.json", safe=""
    )
    with urllib.request.urlopen(url) as resp:
        assert json.load(resp)["generation"] == second
    with pytest.raises(PreconditionFailed):
        store.put_if_match("versions.json", b"same", first)


def test_conditional_writes_are_multipart_uploads(faulty: Any) -> None:
    """fake-gcs-server (like any server) checks ``ifGenerationMatch`` on multipart
    uploads; it ignores it on ``uploadType=media``, which must never carry it."""
    proxy, store = faulty(lambda *_: None)
    assert store.put_if_absent("manifests/m.json", b"m")
    assert not store.put_if_absent("manifests/m.json", b"again")
    etag = store.put_if_match("versions.json", b"v0", None)
    store.put_if_match("versions.json", b"v1", etag)
    uploads = [q for m, _, q in proxy.requests if m == "POST" and "uploadType" in q]
    assert [(q["uploadType"], q.get("ifGenerationMatch")) for q in uploads] == [
        ("multipart", "0"),
        ("multipart", "0"),
        ("multipart", "0"),
        ("multipart", etag),
    ]


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 0], ids=lambda s: f"{s or 'reset'}")
def test_transient_errors_are_retried(faulty: Any, status: int) -> None:
    proxy, store = faulty(first(2, status))
    store.put("blobs/a", b"payload")
    assert store.get("blobs/a") == b"payload"
    assert proxy.count("POST") == 3  # two failed attempts, then the write


def test_a_lost_race_is_not_retried(faulty: Any) -> None:
    proxy, store = faulty(lambda *_: None)
    assert store.put_if_absent("manifests/m.json", b"m")
    assert not store.put_if_absent("manifests/m.json", b"other")
    assert proxy.count("POST") == 2  # the 412 answered once, not tried again


def test_a_denied_call_fails_at_once_naming_the_object_and_what_to_check(faulty: Any) -> None:
    proxy, store = faulty(lambda *_: 403, token=secret_token())
    with pytest.raises(StoreError, match="access denied") as caught:
        store.put("blobs/a", b"x")
    assert len(proxy.requests) == 1
    message = str(caught.value)
    assert store.uri + "/blobs/a" in message and "credentials" in message
    assert f"endpoint {proxy.endpoint}" in message


def test_a_missing_object_is_checkpoint_not_found(store: Store) -> None:
    with pytest.raises(CheckpointNotFound, match="does not exist"):
        store.get("manifests/nothing.json")
    assert store.stat("manifests/nothing.json") is None
    assert store.age("manifests/nothing.json") is None


def test_a_missing_bucket_is_named_with_what_to_do(fake_gcs: FakeGCS) -> None:
    store = Store("gs://no-such-bucket-here/run", fake_gcs.storage_options())
    with pytest.raises(StoreError) as caught:
        store.check_root()
    message = str(caught.value)
    assert "bucket 'no-such-bucket-here' does not exist" in message
    assert f"(endpoint {fake_gcs.endpoint})" in message
    assert "gcloud storage buckets create gs://no-such-bucket-here" in message


def test_credentials_never_reach_messages_or_logs(
    faulty: Any, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, store = faulty(lambda *_: 503, token=secret_token())
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreError) as caught:
        store.put("blobs/a", b"x")
    assert proxy.count("POST") == FAST_RETRY.retry.attempts
    assert proxy.authorizations == [f"Bearer {SECRET}"] * FAST_RETRY.retry.attempts
    said = [str(caught.value), repr(store), caplog.text]
    assert all(SECRET not in text for text in said)


@pytest.mark.parametrize(
    ("fault", "puts"),
    [(503, 4 + 2), (-1, 4 + 1)],  # each retry checks the session's status first
    ids=["refused-part-sent-again", "stored-part-not-sent-again"],
)
def test_a_large_blob_goes_up_in_parts_of_a_resumable_upload(
    faulty: Any, fault: int, puts: int
) -> None:
    """A part that failed is sent again from where the stored bytes end; one whose
    answer was lost after the server stored it is not sent again."""
    proxy, store = faulty(first(1, fault, method="PUT"))
    store = Store(store.uri, store.backend.fs.storage_options, _parts(256 * KiB))
    data = bytes(range(256)) * (3 * KiB + 1)  # four parts, the last one of 256 bytes
    store.put("blobs/big", data)
    assert store.get("blobs/big") == data
    starts = [q for m, _, q in proxy.requests if m == "POST"]
    assert [q["uploadType"] for q in starts] == ["resumable"]
    assert proxy.count("PUT") == puts


def test_a_failed_large_upload_leaves_nothing_and_cancels_its_session(faulty: Any) -> None:
    proxy, store = faulty(first(100, 500, method="PUT"))
    store = Store(store.uri, store.backend.fs.storage_options, _parts(256 * KiB))
    with pytest.raises(StoreError):
        store.put("blobs/big", bytes(600 * KiB))
    assert store.list_keys("blobs") == []
    assert proxy.count("DELETE") == 1  # the session, cancelled
    # GCS lists no upload sessions (it expires abandoned ones itself): gc has none to abort
    assert store.abort_stale_uploads(older_than=1e12) == 0


def _parts(size: int) -> StoreOptions:
    return StoreOptions(part_size=size, retry=FAST_RETRY.retry)


def test_local_gcs_script_serves_until_stopped() -> None:
    """``infra/local-gcs.sh``: what it prints to export is all a repository needs."""
    proc = infra_script("local-gcs.sh")
    with reaped(proc):
        env = exported_env(proc)
        assert env["STORAGE_EMULATOR_HOST"].startswith("http://127.0.0.1:")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", env["STORAGE_EMULATOR_HOST"])
            repo = Repo("gs://checkpoints/runs/x")
            version = repo.commit({"w": torch.ones(2)})
            assert [v.id for v in repo.versions()] == [version.id]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("mode", [REFUSE, SILENT])
def test_a_dead_endpoint_is_reported_within_the_call_budget(fake_gcs: FakeGCS, mode: str) -> None:
    options = StoreOptions(
        connect_timeout=1, read_timeout=1, retry=RetryPolicy(total_seconds=4, max_backoff=0.5)
    )
    with DyingEndpoint(fake_gcs.endpoint, mode) as proxy:
        store = Store(fake_gcs.fresh_uri("dead"), {"endpoint_url": proxy.endpoint}, options)
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"endpoint {proxy.endpoint}"):
            store.put("blobs/a", b"x")
        assert time.monotonic() - started < 4 + 1 + 1  # the budget, one read timeout, slack


def test_the_servers_client_sees_what_a_repository_stored(fake_gcs: Any) -> None:
    uri = fake_gcs.fresh_uri("client")
    store = Store(uri, fake_gcs.storage_options())
    store.put("blobs/x", b"abc")
    bucket, prefix = uri.removeprefix("gs://").split("/", 1)
    blob = fake_gcs.client().bucket(bucket).blob(f"{prefix}/blobs/x")
    assert blob.download_as_bytes() == b"abc"
