"""Conditional writes, one strategy per kind of store.

The commit protocol needs two primitives beyond plain get/put: *create if absent*
(manifests) and *replace if unchanged* (``versions.json``, compare-and-swap on an ETag).

* S3 (and S3-compatible servers): ``If-None-Match: *`` and ``If-Match: <etag>`` on PUT.
* Local files: hard link (atomic create) and an ``flock``-held read-compare-rename.
* ``memory://``: a process-wide lock.
* Anything else: best effort under a warning -- single-writer mode.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import tempfile
import threading
import time
import warnings
from typing import Any, Protocol

import fsspec
import xxhash
from fsspec.asyn import sync

from cloudckpt.errors import CorruptCheckpoint, PreconditionFailed, StoreError
from cloudckpt.store.retry import error_code

log = logging.getLogger("cloudckpt.store")


class LockTimeout(StoreError):
    """A local compare-and-swap waited too long for the lock of another process."""


def local_etag(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


class Conditional(Protocol):
    def read(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None if it does not exist."""

    def create(self, path: str, data: bytes) -> bool:
        """Write only if absent; False if the object already existed."""

    def replace(self, path: str, data: bytes, etag: str | None) -> str:
        """Write only if the current ETag is ``etag`` (None: only if absent); new ETag.

        Raises PreconditionFailed if another writer got there first.
        """


class S3Conditional:
    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        bucket, key, _ = self.fs.split_path(path)
        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=bucket, Key=key, **kwargs)

    def read(self, path: str) -> tuple[bytes, str] | None:
        async def _get() -> tuple[bytes, str]:
            bucket, key, _ = self.fs.split_path(path)
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with resp["Body"] as body:
                data = await body.read()
            return data, resp["ETag"]

        try:
            return sync(self.fs.loop, _get)
        except FileNotFoundError:
            return None

    def create(self, path: str, data: bytes) -> bool:
        try:
            self._call("put_object", path, Body=data, IfNoneMatch="*")
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or _lost_race(e):
                return False
            raise
        self.fs.invalidate_cache(path)
        return True

    def replace(self, path: str, data: bytes, etag: str | None) -> str:
        cond = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            out = self._call("put_object", path, Body=data, **cond)
        except OSError as e:
            if isinstance(e, FileExistsError) or _lost_race(e):
                raise PreconditionFailed(
                    f"{path} changed under us (expected ETag {etag})"
                ) from None
            raise
        self.fs.invalidate_cache(path)
        return out["ETag"]


def _lost_race(exc: BaseException) -> bool:
    code, status = error_code(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class LocalConditional:
    """Atomic create by hard link; compare-and-swap under an exclusive ``flock``.

    The lock is waited for at most ``lock_timeout`` seconds: a process frozen while it
    holds it (SIGSTOP) must not hang every other writer. It is never broken -- the frozen
    holder may still complete its swap -- so the waiter fails with a clear error.
    """

    def __init__(self, lock_timeout: float = 60.0) -> None:
        self.lock_timeout = lock_timeout

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = read_regular_file(path)
        except FileNotFoundError:
            return None
        return data, local_etag(data)

    def create(self, path: str, data: bytes) -> bool:
        tmp = write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def replace(self, path: str, data: bytes, etag: str | None) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a+b") as lock:
            self._lock(lock, path)
            try:
                current = self.read(path)
                if (current[1] if current else None) != etag:
                    raise PreconditionFailed(f"{path} changed under us (expected ETag {etag})")
                os.replace(write_temp(path, data), path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return local_etag(data)

    def _lock(self, lock: Any, path: str) -> None:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"{path}.lock has been held for over {self.lock_timeout:.0f}s by "
                        "another process (stopped or hung?); find it with `fuser`, resume or "
                        "end it, then retry"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)


def read_regular_file(path: str, most: int | None = None) -> bytes:
    """The file's bytes (at most ``most``). Anything but a regular file -- a directory, a
    named pipe that would block forever, a device -- is refused without reading it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptCheckpoint(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read() if most is None else f.read(most)
    finally:
        os.close(fd)


def write_temp(path: str, data: bytes | bytearray | memoryview) -> str:
    """Write ``data`` durably to a temporary file beside ``path``; return its name."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


class LockedConditional:
    """Read-compare-write under a lock of this process.

    Exact for ``memory://``; for other stores without conditional writes it protects
    only against writers in this process (single-writer mode).
    """

    _lock = threading.Lock()

    def __init__(self, fs: fsspec.AbstractFileSystem, exact: bool) -> None:
        self.fs = fs
        if not exact:
            warnings.warn(
                f"store protocol {fs.protocol!r} has no conditional writes in cloudckpt: "
                "single-writer mode, do not commit from two processes at once",
                stacklevel=3,
            )

    def read(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return data, local_etag(data)

    def create(self, path: str, data: bytes) -> bool:
        with self._lock:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True

    def replace(self, path: str, data: bytes, etag: str | None) -> str:
        with self._lock:
            current = self.read(path)
            if (current[1] if current else None) != etag:
                raise PreconditionFailed(f"{path} changed under us (expected ETag {etag})")
            self.fs.pipe_file(path, data)
        return local_etag(data)


def for_filesystem(fs: fsspec.AbstractFileSystem) -> Conditional:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a"}:
        return S3Conditional(fs)
    if protocols & {"file", "local"}:
        return LocalConditional()
    return LockedConditional(fs, exact="memory" in protocols)
