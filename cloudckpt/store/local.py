"""``file://`` (or an absolute path): a directory of files, possibly on a shared file system.

Every path stays under the root's real path (a symbolic link planted inside the
repository is refused), only regular files are read (a named pipe would block forever),
writes land by an atomic rename of a durable temporary, creates by hard link, and
compare-and-swap runs under an ``flock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from typing import Any

from cloudckpt.errors import CorruptCheckpoint, PreconditionFailed, StoreError
from cloudckpt.store.backend import Buffer, RetriedCall, content_etag
from cloudckpt.store.fsspec_generic import FsspecBackend
from cloudckpt.store.options import StoreOptions

__all__ = ["LocalBackend", "LocalConditional", "LockTimeout"]


class LockTimeout(StoreError):
    """A local compare-and-swap waited too long for the lock of another process."""


class LocalBackend(FsspecBackend):
    """Files under a root directory (see ``backend.Backend``)."""

    in_place = True

    def __init__(
        self, uri: str, protocol: str, storage_options: dict[str, Any], options: StoreOptions
    ) -> None:
        super().__init__(uri, protocol, storage_options, options)
        self._real_root = os.path.realpath(self.root)
        self.conditional = LocalConditional()

    def path(self, key: str) -> str:
        found = f"{self.root}/{key}"
        if key:
            # A symbolic link planted inside the repository must not lead a read or a
            # write outside it (the root itself may be a link: the user chose it).
            real = os.path.realpath(found)
            if real != self._real_root and not real.startswith(self._real_root + os.sep):
                raise CorruptCheckpoint(
                    f"{self.uri}/{key} leads outside {self.uri} through a symbolic link; refused"
                )
        return found

    def get(self, key: str, most: int | None = None) -> bytes:
        return read_regular_file(self.path(key), most)

    def read_into(self, key: str, buffers: list[memoryview]) -> bool:
        fd = os.open(self.path(key), os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptCheckpoint(f"{self.uri}/{key} is not a regular file")
            if st.st_size != sum(b.nbytes for b in buffers):
                return False
            return _preadv_all(fd, buffers)
        finally:
            os.close(fd)

    def put(self, key: str, data: Buffer, call: RetriedCall) -> None:
        path = self.path(key)
        call("put", key, lambda: os.replace(write_temp(path, data), path))  # no copy

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self.conditional.create(self.path(key), data)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        return self.conditional.read(self.path(key))

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        return self.conditional.replace(self.path(key), data, etag)

    def clock(self) -> float:
        """The file system's time now: that of a file written now (on a network file
        system, the server's clock, which every machine sharing it agrees on)."""
        os.makedirs(self.root, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.root, prefix=".tmp-clock-")
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(probe)

    def abort_stale_writes(self, older_than: float, call: RetriedCall) -> int:
        """Remove the temporary files of writers killed before their rename."""
        removed = 0
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    if name.startswith(".tmp-") and os.stat(path).st_mtime < older_than:
                        os.remove(path)
                        removed += 1
        return removed


class LocalConditional:
    """Atomic create by hard link; compare-and-swap under an exclusive ``flock``.

    The lock is waited for at most ``lock_timeout`` seconds: a process frozen while it
    holds it (SIGSTOP) must not hang every other writer. It is never broken -- the frozen
    holder may still complete its swap -- so the waiter fails with a clear error.
    """

    def __init__(self, lock_timeout: float = 60.0) -> None:
        self.lock_timeout = lock_timeout

    def read(self, path: str) -> tuple[bytes, str] | None:
        """The file's bytes and ETag, or None if it does not exist."""
        try:
            data = read_regular_file(path)
        except FileNotFoundError:
            return None
        return data, content_etag(data)

    def create(self, path: str, data: bytes) -> bool:
        """Write only if absent; False if the file already existed."""
        tmp = write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def replace(self, path: str, data: bytes, etag: str | None) -> str:
        """Write only if the ETag is still ``etag`` (None: only if absent); the new ETag."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _open_lock(path + ".lock") as lock:
            self._lock(lock, path)
            try:
                current = self.read(path)
                if (current[1] if current else None) != etag:
                    raise PreconditionFailed(f"{path} changed under us (expected ETag {etag})")
                os.replace(write_temp(path, data), path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return content_etag(data)

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


def _preadv_all(fd: int, buffers: list[memoryview]) -> bool:
    """Fill ``buffers`` from the file's first byte; False if it ends first."""
    offset, left = 0, [b.cast("B") for b in buffers if b.nbytes]
    while left:
        n = os.preadv(fd, left, offset)
        if n == 0:
            return False
        offset += n
        while left and n >= left[0].nbytes:
            n -= left[0].nbytes
            left.pop(0)
        if n:
            left[0] = left[0][n:]
    return True


def write_temp(path: str, data: Buffer) -> str:
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


def _open_lock(path: str) -> Any:
    """The lock file at ``path``, never through a symbolic link (one planted there would
    have the lock create or touch a file outside the repository)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise CorruptCheckpoint(f"{path} is a symbolic link; refused") from None
    return os.fdopen(fd, "a+b")
