"""Backends: which one serves a URI, and their conditional writes on real stores."""

from __future__ import annotations

import ast
import pathlib
import uuid
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint, PreconditionFailed
from cloudckpt.store import Store, StoreOptions
from cloudckpt.store.backend import BACKENDS, Backend
from cloudckpt.store.fsspec_generic import SingleWriterBackend
from cloudckpt.store.local import LocalBackend
from cloudckpt.store.memory import MemoryBackend
from cloudckpt.store.s3 import S3Backend

S3_OPTIONS = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}


class OtherFileSystem(MemoryFileSystem):
    """A file system cloudckpt has no backend for (in memory, so no server is needed)."""

    protocol = "othermem"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return str(MemoryFileSystem._strip_protocol(path.removeprefix("othermem://")))


@pytest.fixture
def other_scheme() -> Iterator[str]:
    fsspec.register_implementation("othermem", OtherFileSystem, clobber=True)
    yield f"othermem://tests/{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        ("s3://bucket/run", S3Backend),
        ("s3a://bucket/run", S3Backend),
        ("file:///tmp/cloudckpt-backends/run", LocalBackend),
        ("/tmp/cloudckpt-backends/run", LocalBackend),
        ("memory://cloudckpt-backends/run", MemoryBackend),
    ],
)
def test_each_uri_form_is_served_by_its_kind_of_store(uri: str, kind: type) -> None:
    opts = S3_OPTIONS if uri.startswith("s3") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these is single-writer
        store = Store(uri, opts, StoreOptions(fast_path=False))
    assert type(store.backend) is kind
    assert isinstance(store.backend, Backend)
    assert store.url("x") == f"{uri}/x"


def test_a_scheme_without_a_backend_warns_that_it_is_single_writer(other_scheme: str) -> None:
    with pytest.warns(UserWarning, match="single-writer mode"):
        store = Store(other_scheme)
    assert type(store.backend) is SingleWriterBackend
    store.put("a/b", b"1")
    assert store.list_keys() == ["a/b"]


def test_a_line_in_the_table_gives_a_scheme_its_backend(
    other_scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(BACKENDS, "othermem", "cloudckpt.store.memory:MemoryBackend")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = Store(other_scheme)
    assert type(store.backend) is MemoryBackend


@pytest.fixture
def any_backend(backend: tuple[str, dict[str, Any]]) -> Backend:
    """The backend of an empty root on memory://, file://, moto and SeaweedFS."""
    return Store(*backend).backend


def test_put_if_absent_creates_once(any_backend: Backend) -> None:
    assert any_backend.put_if_absent("manifests/m.json", b"first")
    assert not any_backend.put_if_absent("manifests/m.json", b"second")
    assert not any_backend.put_if_absent("manifests/m.json", b"first")
    found = any_backend.read_versioned("manifests/m.json")
    assert found is not None and found[0] == b"first"


def test_put_if_match_refuses_a_stale_etag_and_keeps_the_winner(any_backend: Backend) -> None:
    assert any_backend.read_versioned("versions.json") is None
    first = any_backend.put_if_match("versions.json", b"v0", None)
    with pytest.raises(PreconditionFailed):
        any_backend.put_if_match("versions.json", b"again", None)
    assert any_backend.read_versioned("versions.json") == (b"v0", first)
    second = any_backend.put_if_match("versions.json", b"v1", first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        any_backend.put_if_match("versions.json", b"stale", first)
    assert any_backend.read_versioned("versions.json") == (b"v1", second)


def test_in_place_reads_are_declared_by_the_kind_of_store(backend: tuple[str, Any]) -> None:
    store = Store(*backend)
    assert store.in_place is (type(store.backend) is LocalBackend)
    if not store.in_place:
        store.put("blobs/x", b"0123")
        out = bytearray(4)
        assert store.read_into("blobs/x", [memoryview(out)]) is False  # read it whole
        assert out == bytearray(4)


def test_a_local_read_into_fills_the_buffers_only_from_a_file_of_their_length(
    tmp_path: pathlib.Path,
) -> None:
    store = Store(f"file://{tmp_path}/repo")
    store.put("blobs/x", b"head" + bytes(range(100)))
    head, body = bytearray(4), bytearray(100)
    assert store.read_into("blobs/x", [memoryview(head), memoryview(body)])
    assert head == b"head" and body == bytes(range(100))
    for size in (99, 101):  # shorter or longer than the file: nothing is read
        untouched = bytearray(size)
        assert not store.read_into("blobs/x", [memoryview(bytearray(4)), memoryview(untouched)])
        assert untouched == bytearray(size)
    with pytest.raises(CheckpointNotFound):
        store.read_into("blobs/missing", [memoryview(body)])
    (tmp_path / "repo" / "blobs" / "dir").mkdir()
    with pytest.raises(CorruptCheckpoint, match="not a regular file"):
        store.read_into("blobs/dir", [memoryview(body)])


def test_conditional_writes_of_the_single_writer_backend_hold_within_a_process(
    other_scheme: str,
) -> None:
    with pytest.warns(UserWarning):
        backend = Store(other_scheme).backend
    assert backend.put_if_absent("m.json", b"first")
    assert not backend.put_if_absent("m.json", b"second")
    etag = backend.put_if_match("v.json", b"v0", None)
    backend.put_if_match("v.json", b"v1", etag)
    with pytest.raises(PreconditionFailed):
        backend.put_if_match("v.json", b"stale", etag)


def test_the_store_layer_imports_no_torch_and_nothing_above_it() -> None:
    allowed = {"cloudckpt.errors", "cloudckpt.redact", "cloudckpt"}
    package = pathlib.Path(__file__).parent.parent / "cloudckpt" / "store"
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                if node.module == "cloudckpt":
                    names = [f"cloudckpt.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("torch"), f"{module.name} imports {name}"
                if name.startswith("cloudckpt") and not name.startswith("cloudckpt.store"):
                    assert name in allowed, f"{module.name} imports {name}"
