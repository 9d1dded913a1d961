"""Shared fixtures: real local S3 servers (moto and SeaweedFS) and a Google Cloud Storage
server (fake-gcs-server) on 127.0.0.1.

Each server is started once per test session and stopped by its own PID at the end.
Every test gets a fresh prefix in the session's bucket, so tests never see each other's
objects (a new bucket per test is slow on SeaweedFS: each one grows new volumes).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from cloudckpt.testing.local_azure import Azurite
from cloudckpt.testing.local_gcs import FakeGCS
from cloudckpt.testing.local_s3 import MotoServer, SeaweedFS


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    with MotoServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with SeaweedFS(tmp_path_factory.mktemp("weed")) as srv:
        yield srv


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGCS]:
    with FakeGCS(tmp_path_factory.mktemp("gcs")) as srv:
        yield srv


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with Azurite(tmp_path_factory.mktemp("azurite")) as srv:
        yield srv


#: The servers behind the remote kinds of ``make_root``: kind -> session fixture.
SERVERS = {"moto": "moto_server", "seaweedfs": "seaweedfs", "gcs": "fake_gcs", "azurite": "azurite"}
BACKENDS = ["memory", "file", "moto", "seaweedfs", "gcs", "azurite"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """(uri, storage_options) of an empty repository root on each kind of store."""
    return make_root(request, request.param, tmp_path)


@pytest.fixture(params=["file", "seaweedfs", "gcs", "azurite"])
def root(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """(uri, storage_options) of an empty repository on local files, SeaweedFS, GCS and
    Azurite."""
    return make_root(request, request.param, tmp_path)


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_backend(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    return make_root(request, request.param, tmp_path)


def make_root(
    request: pytest.FixtureRequest, kind: str, tmp_path: Any
) -> tuple[str, dict[str, Any]]:
    if kind == "memory":
        return f"memory://cloudckpt-tests/{uuid.uuid4().hex}", {}
    if kind == "file":
        return f"file://{tmp_path}/repo", {}
    server = request.getfixturevalue(SERVERS[kind])
    return server.fresh_uri("test"), server.storage_options()


class S3Requests:
    """Records every S3 request a store sends (method, key) and the S3 operations behind
    them: s3fs's through botocore's events, the fast path's (obstore) at its own calls."""

    _FAST: ClassVar[dict[str, tuple[str, str]]] = {
        "get": ("GET", "GetObject"),
        "get_versioned": ("GET", "GetObject"),
        "put": ("PUT", "PutObject"),
        "put_if": ("PUT", "PutObject"),
        "head": ("HEAD", "HeadObject"),
    }

    def __init__(self, store: Any) -> None:
        from fsspec.asyn import sync

        self.calls: list[tuple[str, str]] = []
        self.operations: set[str] = set()
        fs = store.fs
        sync(fs.loop, fs.set_session)
        fs.s3.meta.events.register("before-send.s3", self._record)
        fs.s3.meta.events.register(
            "before-call.s3", lambda model, **_: self.operations.add(model.name)
        )
        self._prefix = f"/{store.root}/"
        if store.backend.transport is not None:
            for name, (method, operation) in self._FAST.items():
                setattr(
                    store.backend.transport,
                    name,
                    self._recorded(getattr(store.backend.transport, name), method, operation),
                )

    def _recorded(self, call: Any, method: str, operation: str) -> Any:
        def recorded(key: str, *args: Any) -> Any:
            self.calls.append((method, key))
            self.operations.add(operation)
            return call(key, *args)

        return recorded

    def _record(self, request: Any, **_: Any) -> None:
        from urllib.parse import unquote, urlsplit

        path = unquote(urlsplit(request.url).path)
        key = path[len(self._prefix) :] if path.startswith(self._prefix) else path
        self.calls.append((request.method, key))

    def count(self, method: str, prefix: str = "") -> int:
        return sum(1 for m, k in self.calls if m == method and k.startswith(prefix))

    def keys(self, method: str, prefix: str = "") -> list[str]:
        return [k for m, k in self.calls if m == method and k.startswith(prefix)]
