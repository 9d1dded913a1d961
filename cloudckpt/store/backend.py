"""What a kind of store must provide, and which one serves a URI.

``Store`` (the facade) checks keys, runs every call under the retry policy and its
deadline, and turns failures into ``StoreError`` / ``CheckpointNotFound`` naming the
object and the endpoint. A *backend* is the rest: the requests of one kind of store.
Backends are chosen once, from the URI's scheme, through ``BACKENDS``.

Adding a kind of store (GCS, Azure...) is one module with a class that satisfies
``Backend`` -- usually a subclass of ``fsspec_generic.FsspecBackend`` that overrides
the calls its store does better (conditional writes above all) -- and one line in
``BACKENDS``.
"""

from __future__ import annotations

import datetime
import importlib
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

import fsspec
import xxhash

from cloudckpt.errors import StoreError
from cloudckpt.store.options import StoreOptions

__all__ = [
    "BACKENDS",
    "Backend",
    "Buffer",
    "ObjectInfo",
    "RetriedCall",
    "open_backend",
    "root_exists",
]

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview

#: URI scheme -> ``"module:Class"`` of its backend, imported on first use (as fsspec's
#: registry does): a ``file://`` user never imports s3fs or obstore.
BACKENDS: dict[str, str] = {
    "s3": "cloudckpt.store.s3:S3Backend",
    "s3a": "cloudckpt.store.s3:S3Backend",
    "gs": "cloudckpt.store.gcs:GCSBackend",
    "gcs": "cloudckpt.store.gcs:GCSBackend",
    "file": "cloudckpt.store.local:LocalBackend",
    "local": "cloudckpt.store.local:LocalBackend",
    "memory": "cloudckpt.store.memory:MemoryBackend",
    "az": "cloudckpt.store.azure:AzureBackend",
    "abfs": "cloudckpt.store.azure:AzureBackend",
    "abfss": "cloudckpt.store.azure:AzureBackend",
}
#: Any other scheme fsspec knows: conditional writes hold only within this process.
FALLBACK = "cloudckpt.store.fsspec_generic:SingleWriterBackend"


@dataclass(frozen=True)
class ObjectInfo:
    """An object's size in bytes and last modification time (seconds since the epoch)."""

    size: int
    modified: float

    @classmethod
    def of(cls, info: dict[str, Any]) -> ObjectInfo:
        when = info.get("LastModified") or info.get("mtime") or info.get("created") or 0.0
        if isinstance(when, datetime.datetime):
            when = when.timestamp()
        return cls(int(info.get("size") or 0), float(when))


class RetriedCall(Protocol):
    """``call(what, key, fn)``: ``fn()`` under the store's retries and deadline, its
    failures translated (``what`` and ``key`` name the call in messages)."""

    def __call__(self, what: str, key: str, fn: Callable[[], T]) -> T: ...


@runtime_checkable
class Backend(Protocol):
    """The requests of one kind of store, on keys relative to its root.

    A backend's class is built as ``cls(uri, protocol, storage_options, options)``.
    Keys reach it checked (``check_key``). Each method is *one attempt*: ``Store``
    retries it, except the methods given a ``call``, which make several requests and
    run each through it (a multipart upload retries per part).
    """

    #: The fsspec file system under the backend (listings, and what integrations read).
    fs: fsspec.AbstractFileSystem
    #: The root as ``fs`` names it (no scheme, no trailing ``/``).
    root: str
    #: `` (endpoint ...)`` for messages (never a credential), or ``""``.
    endpoint: str
    #: Calls cross a network: each attempt is watched against the call's deadline.
    remote: bool
    #: Objects are files on this machine's disk: ``read_into`` reads one in place.
    in_place: bool

    def path(self, key: str) -> str:
        """The ``fs`` path of ``key``; refuses one that would lead outside the root."""
        ...

    def get(self, key: str, most: int | None = None) -> bytes | memoryview:
        """The whole object, or its first ``most`` bytes without transferring the rest;
        FileNotFoundError if absent; refuses what is not an object (a directory, a pipe)."""
        ...

    def read_into(self, key: str, buffers: list[memoryview]) -> bool:
        """Fill ``buffers`` in order with the object's bytes, without a copy, if it is
        exactly as long as they are together -- one open serves the size check and the
        reads; False (nothing or part read) if it is not, or changed meanwhile. Only
        where ``in_place`` (elsewhere always False); FileNotFoundError if absent; refuses
        what is not a file."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and modification time, or None if absent (one HEAD)."""
        ...

    def put(self, key: str, data: Buffer, call: RetriedCall) -> None:
        """Write the object whole: no reader ever sees part of it."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if absent, atomically; False if an object was already there."""
        ...

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag, or None if absent."""
        ...

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        """Replace only if the ETag is still ``etag`` (None: only if absent), atomically;
        the new ETag, or PreconditionFailed if another writer got there first."""
        ...

    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        """Key -> info of every object under ``prefix``, the backend's own temporaries
        and locks left out."""
        ...

    def delete(self, keys: list[str], guard: Callable[[], None] | None) -> None:
        """Remove a batch of objects (absent ones are no error); ``guard()`` runs before
        every request and may raise to stop."""
        ...

    def age(self, key: str) -> float | None:
        """Seconds since the object was written, by the store's clock; None if absent."""
        ...

    def abort_stale_writes(self, older_than: float, call: RetriedCall) -> int:
        """Remove what killed writers left, started before ``older_than`` (seconds since
        the epoch, by the store's clock); how many."""
        ...

    def check_root(self, call: RetriedCall) -> None:
        """Raise StoreError if the root cannot exist (a missing bucket), else nothing."""
        ...

    def missing_root(self, error: BaseException) -> StoreError | None:
        """The error to raise instead of ``error`` when it says the root is missing."""
        ...


def open_backend(uri: str, storage_options: dict[str, Any], options: StoreOptions) -> Backend:
    """The backend for ``uri`` (no scheme: a local path), chosen by its scheme."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    module, _, name = BACKENDS.get(protocol, FALLBACK).partition(":")
    backend: Backend = getattr(importlib.import_module(module), name)(
        uri, protocol, storage_options, options
    )
    return backend


def content_etag(data: bytes) -> str:
    """The ETag of a store without ETags of its own: a hash of the object's bytes."""
    return xxhash.xxh3_128_hexdigest(data)


def clear_frames(exc: BaseException | None) -> None:
    """Drop the locals of the frames a caught exception's traceback holds.

    s3fs keeps the exception it translates in a local of its retry frame: a reference
    cycle that, through the frames' callers, keeps the caller's buffers alive (a blob
    about to be uploaded after a HEAD found nothing) until Python's cyclic collector runs.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def root_exists(probe: Callable[[], object]) -> bool:
    """Whether a bucket or container exists, by one request ``probe`` (for ``check_root``):
    False if it says not found; True if it answers or may not ask (the object calls will
    say what is wrong then)."""
    try:
        probe()
    except FileNotFoundError as e:
        clear_frames(e)
        return False
    except PermissionError as e:
        clear_frames(e)
    return True
