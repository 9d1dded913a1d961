"""Any fsspec file system through its generic calls: the base of every backend, and the
backend of the schemes cloudckpt has no backend of its own for (single writer)."""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import fsspec

from cloudckpt.errors import PreconditionFailed, StoreError
from cloudckpt.store.backend import Buffer, ObjectInfo, RetriedCall, clear_frames, content_etag
from cloudckpt.store.options import StoreOptions

__all__ = ["FsspecBackend", "SingleWriterBackend"]


class FsspecBackend:
    """The objects under a root of an fsspec file system (see ``backend.Backend``).

    Conditional writes are a read-compare-write under a lock of this process: exact
    where the objects live in this process (``memory://``), a guard against this
    process's other writers only anywhere else. Subclasses override what their store
    does better.
    """

    remote = False
    endpoint = ""
    in_place = False
    #: One lock for every store of this process (two handles may name one object).
    _swap_lock = threading.Lock()

    def __init__(
        self, uri: str, protocol: str, storage_options: dict[str, Any], options: StoreOptions
    ) -> None:
        self.uri = uri
        self.options = options
        self.fs = fsspec.filesystem(protocol, **storage_options)
        self.root: str = self.fs._strip_protocol(uri).rstrip("/")

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def get(self, key: str, most: int | None = None) -> bytes | memoryview:
        if most is None:
            return self.fs.cat_file(self.path(key))  # type: ignore[no-any-return]
        return self.fs.cat_file(self.path(key), start=0, end=most)  # type: ignore[no-any-return]

    def read_into(self, key: str, buffers: list[memoryview]) -> bool:
        return False  # not on this machine's disk: the caller reads the object whole

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            return ObjectInfo.of(self.fs.info(self.path(key)))
        except FileNotFoundError as e:
            clear_frames(e)
            return None

    def put(self, key: str, data: Buffer, call: RetriedCall) -> None:
        path = self.path(key)
        body = data.tobytes() if isinstance(data, memoryview) else data
        call("put", key, lambda: self.fs.pipe_file(path, body))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self.path(key)
        with self._swap_lock:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            return None
        return data, content_etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        path = self.path(key)
        with self._swap_lock:
            current = self.read_versioned(key)
            if (current[1] if current else None) != etag:
                raise PreconditionFailed(f"{path} changed under us (expected ETag {etag})")
            self.fs.pipe_file(path, data)
        return content_etag(data)

    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        try:
            found = self.fs.find(self.path(prefix).rstrip("/"), detail=True)
        except FileNotFoundError:
            found = {}
        start = len(self.root) + 1
        return {
            p[start:]: ObjectInfo.of(info)
            for p, info in found.items()
            if not _internal(p[start:]) and info.get("type", "file") != "directory"
        }

    def delete(self, keys: list[str], guard: Callable[[], None] | None) -> None:
        if guard is not None:
            guard()
        for key in keys:  # one request each: guard each
            if guard is not None:
                guard()
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(key))

    def age(self, key: str) -> float | None:
        info = self.stat(key)
        return None if info is None else self.clock() - info.modified

    def clock(self) -> float:
        """The store's time now (here: this process's clock)."""
        return time.time()

    def abort_stale_writes(self, older_than: float, call: RetriedCall) -> int:
        return 0  # every write here is a single request: nothing is left half done

    def check_root(self, call: RetriedCall) -> None:
        return None  # a root is created by the first write

    def missing_root(self, error: BaseException) -> StoreError | None:
        return None


class SingleWriterBackend(FsspecBackend):
    """A scheme without a backend of its own: conditional writes protect only against
    writers of this process, so one process may write a repository at a time."""

    def __init__(
        self, uri: str, protocol: str, storage_options: dict[str, Any], options: StoreOptions
    ) -> None:
        super().__init__(uri, protocol, storage_options, options)
        warnings.warn(
            f"store protocol {self.fs.protocol!r} has no conditional writes in cloudckpt: "
            "single-writer mode, do not commit from two processes at once",
            stacklevel=3,
        )


def _internal(key: str) -> bool:
    """A backend's own object (a local temporary or lock), not one of the repository's."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(".tmp-") or name.endswith(".lock")
