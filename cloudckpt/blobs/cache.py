"""A size-bounded directory of blobs on this host, keyed by content hash.

Saves and loads put the raw (decoded) bytes of each blob they move here; a later load on
the same host reads them from here instead of the store. Every read is checked against
the hash that names the file, so a damaged or truncated file is a miss (and removed),
never wrong data. Files are created whole (written under a temporary name, then renamed),
so processes on one host may share a cache, and any file -- or the whole directory -- may
be deleted at any time; a process killed mid-write leaves only a temporary file. The
least recently used files go first once the cache is over ``max_bytes``.

Bytes nobody else holds (a host copy of a GPU chunk, a pack, a blob copied from a tier)
are written by a background thread (:meth:`BlobCache.put_later`), off the save's path;
the thread ends when it runs dry and is joined at interpreter exit, so a clean exit
keeps what was queued.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

from cloudckpt import codec

log = logging.getLogger("cloudckpt.cache")

MiB, GiB = 1 << 20, 1 << 30
_TMP = ".tmp-"


@dataclass(frozen=True)
class CacheOptions:
    """Where the blob cache lives and how large it may grow (``max_bytes``; the least
    recently used blobs are evicted past it). ``max_pending_bytes`` bounds the memory
    held by blobs waiting for the background writer; past it the caller writes."""

    path: str
    max_bytes: int = 64 * GiB
    max_pending_bytes: int = 256 * MiB

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pending_bytes < 0:
            raise ValueError("max_bytes must be positive, max_pending_bytes not negative")


class BlobCache:
    """The blob cache at ``options.path`` (created on first use). Thread-safe, and safe
    to share between processes."""

    def __init__(self, options: CacheOptions) -> None:
        self.options = options
        self.root = os.path.abspath(os.path.expanduser(options.path))
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._size: int | None = None  # bytes held, as last counted (other processes add)
        #: Bytes this process added since it last counted: other processes sharing the
        #: cache add theirs unseen, so the directory is counted again every eighth of
        #: ``max_bytes`` (each sharer overshoots the bound by at most that much).
        self._added = 0
        #: put_later's queue, its bytes, and the thread writing it (None: none running).
        self._pending: deque[tuple[str, Any]] = deque()
        self._pending_bytes = 0
        self._drained = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        _CACHES.add(self)

    def __repr__(self) -> str:
        return f"BlobCache({self.root!r}, max_bytes={self.options.max_bytes})"

    def path(self, digest: str) -> str:
        return os.path.join(self.root, digest[:2], digest)

    def has(self, digest: str, size: int) -> bool:
        """Whether a file of ``size`` bytes is held for ``digest`` (not yet verified)."""
        try:
            return os.stat(self.path(digest)).st_size == size
        except OSError:
            return False

    def read_into(self, digest: str, out: Any) -> bool:
        """Fill ``out`` (a contiguous uint8 numpy array of the blob's raw size) from the
        cache and check its hash; False (``out`` undefined) on a miss or a damaged file."""
        path = self.path(digest)
        try:
            with self._open(digest, os.O_RDONLY) as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size != out.size:
                    raise ValueError("size")
                view = memoryview(out).cast("B")
                got = 0
                while got < out.size:
                    n = f.readinto(view[got:])
                    if not n:
                        raise ValueError("truncated")
                    got += n
            if codec.content_hash(out) != digest:
                raise ValueError("hash")
        except FileNotFoundError:
            self.misses += 1
            return False
        except (OSError, ValueError) as e:
            log.warning("cache: %s is damaged (%s); dropping it", path, e)
            self._remove(path)
            self.misses += 1
            return False
        self._touch(path)
        self.hits += 1
        return True

    def put(self, digest: str, raw: Any) -> None:
        """Keep ``raw`` (a contiguous buffer whose hash is ``digest``) unless held
        already. Never raises: a cache that cannot be written (disk full, read-only) only
        logs."""
        path = self.path(digest)
        size = memoryview(raw).nbytes
        if self.has(digest, size):
            self._touch(path)
            return
        tmp = f"{_TMP}{os.getpid()}-{uuid.uuid4().hex}"
        dfd = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            dfd = self._prefix(digest)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
            try:
                view = memoryview(raw).cast("B")
                done = 0
                while done < size:
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)
            os.replace(tmp, digest, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            log.warning("cache: cannot keep %s (%s)", digest, e)
            if dfd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            return
        finally:
            if dfd is not None:
                os.close(dfd)
        with self._lock:
            if self._size is not None:
                self._size += size
            self._added += size
            limit = self.options.max_bytes
            over = self._size is None or self._size > limit or self._added > limit // 8
        if over:
            self.evict()

    def put_later(self, digest: str, raw: Any) -> None:
        """Keep ``raw`` as :meth:`put` does, from a background thread: the caller does
        not wait -- unless ``max_pending_bytes`` are waiting already: then it is written
        now (the cache's disk is the bottleneck; memory stays bounded). ``raw`` must be
        the caller's to give away: nothing writes to it afterwards."""
        size = memoryview(raw).nbytes
        with self._lock:
            queued = self._pending_bytes + size <= self.options.max_pending_bytes
            if queued:
                self._pending.append((digest, raw))
                self._pending_bytes += size
                queued = self._writing()
                if not queued:  # the interpreter is shutting down: no thread starts
                    self._pending.pop()
                    self._pending_bytes -= size
        if not queued:
            self.put(digest, raw)

    def _writing(self) -> bool:
        """Whether a thread drains the queue (started if none was); under the lock."""
        if self._writer is not None and self._writer.is_alive():
            return True
        # Not a daemon: the interpreter joins it at exit, so what is queued is kept. A
        # forked child has none (is_alive is False there): it starts its own.
        writer = threading.Thread(target=self._drain, name="cloudckpt-cache")
        try:
            writer.start()
        except RuntimeError:
            return False
        self._writer = writer
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every blob :meth:`put_later` queued is written (or given up);
        False if some still wait after ``timeout`` seconds."""
        with self._drained:
            if self._pending and not self._writing():  # no thread can start: at exit
                return False
            return self._drained.wait_for(lambda: not self._pending_bytes, timeout)

    def _forked(self) -> None:
        """In a forked child: the parent's writer thread is gone and its lock may be held
        by a thread that does not exist here. The child keeps what was queued (its own
        writer starts at the next put_later or flush); a blob the parent's writer had
        taken is left to the parent."""
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._writer = None
        self._pending_bytes = sum(memoryview(raw).nbytes for _, raw in self._pending)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._writer = None
                    return
                digest, raw = self._pending.popleft()
            try:
                self.put(digest, raw)
            except Exception:  # put only logs what it expects; this thread must go on
                log.exception("cache: cannot keep %s", digest)
            finally:
                with self._drained:
                    self._pending_bytes -= memoryview(raw).nbytes
                    self._drained.notify_all()

    def evict(self) -> int:
        """Delete the least recently used files until the cache holds at most
        ``max_bytes`` (and temporary files a dead writer left); returns bytes freed."""
        files: list[tuple[float, int, str]] = []
        total = 0
        try:
            tops = list(os.scandir(self.root))
        except FileNotFoundError:
            tops = []
        for top in tops:
            if top.name.startswith(_TMP):
                if _stale_tmp(top.path):
                    self._remove(top.path)
                continue
            if not top.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(top.path))
            except OSError:
                continue
            for entry in entries:
                if entry.name.startswith(_TMP):  # a writer's, or a dead writer's
                    if _stale_tmp(entry.path):
                        self._remove(entry.path)
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, entry.path))
                total += st.st_size
        freed = 0
        if total > self.options.max_bytes:
            for _, size, path in sorted(files):
                if total - freed <= self.options.max_bytes:
                    break
                if self._remove(path):
                    freed += size
        with self._lock:
            self._size, self._added = total - freed, 0
        return freed

    def clear(self) -> None:
        """Drop every blob held."""
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
        with self._lock:
            self._size = 0

    def _prefix(self, digest: str) -> int:
        """The blob's directory, opened without following a symbolic link: nothing
        planted in the cache directory leads a read or a write outside it."""
        prefix = os.path.join(self.root, digest[:2])
        return os.open(prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    def _open(self, digest: str, flags: int) -> Any:
        dfd = self._prefix(digest)
        try:
            fd = os.open(digest, flags | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        finally:
            os.close(dfd)
        return os.fdopen(fd, "rb", buffering=0)

    @staticmethod
    def _touch(path: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(path)  # recency for LRU: atime is unreliable (noatime mounts)

    @staticmethod
    def _remove(path: str) -> bool:
        """Whether ``path`` is gone now. Gone already counts: another process (or thread)
        evicting at once removed it, and an eviction that did not count it would go on
        removing newer files, down to an empty cache."""
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False


def _stale_tmp(path: str, age: float = 3600.0) -> bool:
    import time

    try:
        return time.time() - os.stat(path).st_mtime > age
    except OSError:
        return False


#: This process's caches, so that a forked child can give each fresh locks.
_CACHES: weakref.WeakSet[BlobCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_CACHES):
        cache._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
