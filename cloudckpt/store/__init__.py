"""An object store at a URI, behind fsspec: plain and conditional writes, with retries.

Keys are ``/``-separated paths relative to the store's root URI.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import logging
import os
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import sync

from cloudckpt import redact
from cloudckpt.errors import (
    CheckpointNotFound,
    CloudCkptError,
    CorruptCheckpoint,
    InvalidKey,
    StoreError,
)
from cloudckpt.store import fastpath, multipart
from cloudckpt.store.conditional import (
    Conditional,
    for_filesystem,
    read_regular_file,
    write_temp,
)
from cloudckpt.store.fastpath import FastPath
from cloudckpt.store.retry import RetryPolicy, error_code, is_retryable, refused

__all__ = ["ObjectInfo", "RetryPolicy", "Store", "StoreOptions"]

log = logging.getLogger("cloudckpt.store")
T = TypeVar("T")
_DELETE_BATCH = 500


@dataclass(frozen=True)
class StoreOptions:
    """Timeouts and retries for every call the store makes.

    ``connect_timeout`` bounds opening a connection, ``read_timeout`` the wait for any
    byte of an answer (it restarts with every byte received, so a large transfer that
    keeps moving is never cut); ``retry.total_seconds`` bounds a whole call, retries
    included (see ``RetryPolicy``). The defaults (5 s, 20 s, 60 s) report an endpoint
    that accepts connections and never answers after about a minute, naming it in the
    ``StoreError``; raise them for a store that is known to pause longer (the previous
    defaults were 10 s, 60 s and 180 s).
    """

    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: S3 objects of at least two parts go up as multipart uploads, retried per part
    #: (blobs of the default 16 MiB chunks are single PUTs).
    part_size: int = 32 * 1024 * 1024
    #: On S3, move blob bytes (GET, PUT, HEAD) through obstore, which costs a fraction of
    #: the CPU of s3fs (see ``cloudckpt.store.fastpath``); everything else uses s3fs.
    fast_path: bool = True


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


class Store:
    """The objects under one root URI (``s3://bucket/prefix``, ``file:///dir``, ``memory://x``).

    ``storage_options`` are passed to fsspec exactly as the backend takes them (for S3:
    ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``...); the standard AWS
    environment (``AWS_ENDPOINT_URL``, credentials, profile) applies as usual.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        options: StoreOptions | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.options = options or StoreOptions()
        protocol, _ = fsspec.core.split_protocol(self.uri)
        if protocol is None and not os.path.isabs(self.uri):
            raise ValueError(
                f"{uri!r} has no scheme, so it would name a directory on this machine's disk "
                f"({os.path.abspath(uri)}), lost with the machine. Did you mean "
                f"'s3://{self.uri}'? For a local directory give an absolute path or "
                f"'file://{os.path.abspath(uri)}'"
            )
        protocol = protocol or "file"
        opts = dict(storage_options or {})
        redact.remember(opts)
        self._endpoint = ""
        if protocol in ("s3", "s3a"):
            opts = _s3_defaults(opts, self.options)
            self._endpoint = _endpoint_name(opts)
        self.fs = fsspec.filesystem(protocol, **opts)
        if protocol in ("s3", "s3a"):
            # One retry budget, ours: s3fs and botocore each retry on their own otherwise.
            self.fs.retries = 1
        self.root = self.fs._strip_protocol(self.uri).rstrip("/")
        self._local = protocol in ("file", "local")
        self._real_root = os.path.realpath(self.root) if self._local else ""
        self._http = protocol in ("s3", "s3a")
        # s3fs would first HEAD (and on a miss, LIST) every object it reads in parallel
        # parts; blobs are read whole and in parallel with each other, so one GET each.
        self._get_kwargs = {"max_concurrency": 1} if protocol in ("s3", "s3a") else {}
        self._cond: Conditional = for_filesystem(self.fs)
        self._root_checked = False
        self._fast: FastPath | None = None
        if self._http and self.options.fast_path:
            self._fast = FastPath.for_s3(
                self.root, opts, self.options.connect_timeout, self.options.read_timeout
            )
            if self._fast is not None and self._fast.endpoint:  # from a profile, say
                self._endpoint = _endpoint_name({"endpoint_url": self._fast.endpoint})

    def __repr__(self) -> str:
        return f"Store({redact.redact(self.uri)!r})"

    def path(self, key: str) -> str:
        check_key(key)
        found = f"{self.root}/{key}"
        if self._local and key:
            # A symbolic link planted inside the repository must not lead a read or a
            # write outside it (the root itself may be a link: the user chose it).
            real = os.path.realpath(found)
            if real != self._real_root and not real.startswith(self._real_root + os.sep):
                raise CorruptCheckpoint(
                    f"{self.url(key)} leads outside {self.uri} through a symbolic link; refused"
                )
        return found

    def _fast_path(self) -> FastPath | None:
        return self._fast if self._fast is not None and fastpath.usable() else None

    def url(self, key: str) -> str:
        return f"{self.uri}/{key}"

    # -- the calls -----------------------------------------------------------------
    def _run(self, what: str, key: str, fn: Callable[[], T]) -> T:
        check_key(key)
        try:
            # Over the network each attempt is watched: a retry running past the call's
            # deadline, or a call of a transfer that failed elsewhere, is left behind.
            return self.options.retry.call(fn, f"{what} {self.url(key)}", watch=self._http)
        except CloudCkptError:
            raise  # ours already (not found, lost race, a guard that stopped the call)
        except FileNotFoundError as e:
            if self._http and _no_such_bucket(e):
                raise self._missing_bucket() from e
            raise CheckpointNotFound(f"{self.url(key)} does not exist") from e
        except PermissionError as e:
            if self._http and _no_such_bucket(e):
                raise self._missing_bucket() from e
            raise StoreError(
                f"access denied for {what} {self.url(key)}{self._endpoint}: check the "
                "credentials and the bucket policy for this prefix"
            ) from e
        except Exception as e:
            if refused(e):
                hint = (
                    "nothing is listening at the endpoint: check endpoint_url (or "
                    "AWS_ENDPOINT_URL) and that the server is running"
                )
            elif is_retryable(e):
                hint = "the store kept failing; retry later or raise RetryPolicy limits"
            elif "NoCredentials" in type(e).__name__:
                hint = (
                    "no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                    "AWS_PROFILE, or pass key/secret in storage_options"
                )
            else:
                hint = "check the URI, the endpoint and storage_options"
            raise StoreError(
                redact.redact(
                    f"{what} {self.url(key)}{self._endpoint} failed: {type(e).__name__}: {e} "
                    f"({hint})"
                )
            ) from e

    def check_root(self) -> None:
        """Raise StoreError naming the bucket and the endpoint if the store's bucket does
        not exist (S3: one HeadBucket per handle; other stores create their root on the
        first write). A missing bucket must not look like an empty repository."""
        if not self._http or self._root_checked:
            return
        bucket = self.root.split("/", 1)[0]

        def _head_bucket() -> bool:
            try:
                sync(self.fs.loop, self.fs._call_s3, "head_bucket", Bucket=bucket)
            except FileNotFoundError as e:
                _clear_frames(e)
                return False
            except PermissionError as e:  # not allowed to ask: the object calls will tell
                _clear_frames(e)
            return True

        if not self._run("head-bucket", "", _head_bucket):
            raise self._missing_bucket()
        self._root_checked = True

    def _missing_bucket(self) -> StoreError:
        bucket = self.root.split("/", 1)[0]
        return StoreError(
            f"bucket {bucket!r} does not exist{self._endpoint}: create it (for example "
            f"`aws s3 mb s3://{bucket}`), or check the URI {redact.redact(self.uri)!r} and the "
            "endpoint"
        )

    def get(self, key: str) -> bytes:
        """The whole object; CheckpointNotFound if it does not exist."""
        found = self.get_buffer(key)
        return found if isinstance(found, bytes) else bytes(found)

    def get_buffer(self, key: str, limit: int | None = None) -> bytes | memoryview:
        """The whole object as a read-only buffer, without a copy where the transport
        allows (blobs on S3).

        With ``limit``, at most ``limit + 1`` bytes are ever taken from the store (a
        ranged GET on S3, a bounded read of a file), whatever the object's size, and an
        object longer than ``limit`` bytes is ``CorruptCheckpoint`` naming it.
        """
        if limit is None:
            found = self._run("get", key, self._reader(key, None))
        else:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            found = self._run("get", key, self._reader(key, limit + 1))
            if len(found) > limit:
                raise CorruptCheckpoint(
                    f"{self.url(key)} is longer than the {limit} bytes expected of it"
                )
        return found

    def _reader(self, key: str, most: int | None) -> Callable[[], bytes | memoryview]:
        """One attempt at reading the object, or its first ``most`` bytes."""
        fast = self._fast_path()
        if fast is not None:
            return lambda: fast.get(key, most)
        path = self.path(key)
        if self._local:
            return lambda: read_regular_file(path, most)
        if most is None:
            return lambda: self.fs.cat_file(path, **self._get_kwargs)
        return lambda: _empty_if_unsatisfiable(
            lambda: self.fs.cat_file(path, start=0, end=most, **self._get_kwargs)
        )

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object."""
        return self._run("get", key, lambda: self.fs.cat_file(self.path(key), start=start, end=end))

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and modification time, or None if the object does not exist (one HEAD)."""
        fast = self._fast_path()
        if fast is not None:
            found = self._run("head", key, lambda: fast.head(key))
            return None if found is None else ObjectInfo(*found)

        def _head() -> ObjectInfo | None:
            try:
                return ObjectInfo.of(self.fs.info(self.path(key)))
            except FileNotFoundError as e:
                _clear_frames(e)
                return None

        return self._run("head", key, _head)

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write the object whole (readers never see a partial object)."""
        path = self.path(key)
        if self._http and len(data) >= 2 * self.options.part_size:
            multipart.upload(
                self.fs, path, data, self.options.part_size, lambda w, fn: self._run(w, key, fn)
            )
            return
        fast = self._fast_path()
        if fast is not None:
            self._run("put", key, lambda: fast.put(key, data))
            return
        if self._local:  # a file takes any buffer: no copy
            self._run("put", key, lambda: os.replace(write_temp(path, data), path))
            return
        body = data.tobytes() if isinstance(data, memoryview) else data
        self._run("put", key, lambda: self.fs.pipe_file(path, body))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if no object is at ``key``; False if another object was already there.

        An object with exactly these bytes counts as ours: a retried create whose first
        attempt took effect but lost its response finds it there.
        """
        if self._run("create", key, lambda: self._cond.create(self.path(key), data)):
            return True
        found = self._run("get", key, lambda: self._cond.read(self.path(key)))
        return found is not None and found[0] == bytes(data)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag, or None if absent (for compare-and-swap)."""
        fast = self._fast_path()
        if fast is not None:
            return self._run("get", key, lambda: fast.get_versioned(key))
        return self._run("get", key, lambda: self._cond.read(self.path(key)))

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        """Replace the object only if its ETag is still ``etag`` (None: only if absent).

        Returns the new ETag; raises PreconditionFailed if another writer won.
        """
        return self._run("swap", key, lambda: self._cond.replace(self.path(key), data, etag))

    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted."""
        return sorted(self.list_info(prefix))

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """Key -> size and modification time of every object under ``prefix``."""
        base = self.path(prefix).rstrip("/")

        def _find() -> dict[str, Any]:
            try:
                return self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}

        start = len(self.root) + 1
        found = self._run("list", prefix, _find)
        return {
            p[start:]: ObjectInfo.of(info)
            for p, info in found.items()
            if not _internal(p[start:]) and info.get("type", "file") != "directory"
        }

    def abort_stale_uploads(self, older_than: float) -> int:
        """Abort the writes killed writers left behind, started before ``older_than``
        (seconds since the epoch, by the store's clock): incomplete multipart uploads on
        S3, temporary files on ``file://``. Returns how many."""
        if self._local:
            return self._remove_stale_temporaries(older_than)
        if not self._http:
            return 0
        stale = self._run(
            "list-uploads", "", lambda: multipart.stale_uploads(self.fs, self.root, older_than)
        )
        for path, upload_id in stale:
            key = path[len(self.root) + 1 :]
            self._run(
                "abort-upload", key, lambda p=path, u=upload_id: multipart.abort(self.fs, p, u)
            )
        return len(stale)

    def _file_clock(self) -> float:
        os.makedirs(self.root, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=self.root, prefix=".tmp-clock-")
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            os.unlink(probe)

    def _remove_stale_temporaries(self, older_than: float) -> int:
        removed = 0
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    if name.startswith(".tmp-") and os.stat(path).st_mtime < older_than:
                        os.remove(path)
                        removed += 1
        return removed

    def delete(self, keys: Iterable[str], guard: Callable[[], None] | None = None) -> None:
        """Remove objects; one already gone is not an error (another process deleted it).

        ``guard`` runs before every attempt of every request and may raise to stop
        (a garbage collection whose sweep may have expired must not delete)."""
        keys = list(keys)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            for key in batch:
                check_key(key)
            paths = [self.path(k) for k in batch]

            def _rm(paths: list[str] = paths) -> None:
                if guard is not None:
                    guard()
                if self._http:
                    self.fs.rm(paths)  # one DeleteObjects; absent keys are not errors
                    return
                for path in paths:  # one request each: guard each
                    if guard is not None:
                        guard()
                    with contextlib.suppress(FileNotFoundError):
                        self.fs.rm_file(path)

            self._run("delete", batch[0], _rm)

    def age(self, key: str) -> float | None:
        """Seconds since the object was last written, by the store's clock (None if it
        does not exist): on S3 one HEAD, its ``Date`` against its ``Last-Modified``; on
        local files against the time of a file written now (on a network file system, the
        server's clock); in memory against this process's clock."""
        if self._http:
            bucket, path, _ = self.fs.split_path(self.path(key))

            def _head() -> float | None:
                try:
                    resp = sync(
                        self.fs.loop, self.fs._call_s3, "head_object", Bucket=bucket, Key=path
                    )
                except FileNotFoundError as e:
                    _clear_frames(e)
                    return None
                date = resp["ResponseMetadata"]["HTTPHeaders"]["date"]
                now = email.utils.parsedate_to_datetime(date).timestamp()
                return now - resp["LastModified"].timestamp()

            return self._run("head", key, _head)
        info = self.stat(key)
        if info is None:
            return None
        now = self._run("stat", "", self._file_clock) if self._local else time.time()
        return now - info.modified


def check_key(key: str) -> None:
    """Refuse a key that is not a plain relative object key (``a/b/c``, or a prefix
    ending in ``/``): on a file system ``..``, ``.``, an absolute path or an empty
    segment would reach outside the store's root."""
    if not isinstance(key, str):
        raise InvalidKey(f"{key!r} is not an object key")
    parts = key.removesuffix("/").split("/") if key else []
    if (
        key.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or any(c in key for c in "\\\0")
    ):
        raise InvalidKey(f"{key!r} is not a plain relative object key; refused")


def _empty_if_unsatisfiable(read: Callable[[], bytes]) -> bytes:
    """A ranged read from byte 0 that S3 refuses as unsatisfiable (416 InvalidRange)
    means an empty object."""
    try:
        return read()
    except OSError as e:
        code, status = error_code(e)
        if code == "InvalidRange" or status == 416:
            _clear_frames(e)
            return b""
        raise


def _endpoint_name(opts: dict[str, Any]) -> str:
    """`` (endpoint scheme://host:port)`` of S3 storage options, for messages: never
    userinfo, path or query (nothing that could carry a credential)."""
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    if not endpoint:
        region = (opts.get("client_kwargs") or {}).get("region_name") or os.environ.get(
            "AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "")
        )
        return f" (endpoint: AWS S3{' ' + region if region else ''})"
    try:
        url = urllib.parse.urlsplit(str(endpoint))
        host = url.hostname or "?"
        if ":" in host:
            host = f"[{host}]"
        port = f":{url.port}" if url.port else ""
        return f" (endpoint {url.scheme}://{host}{port})"
    except ValueError:
        return " (endpoint: unparsable endpoint_url)"


def _clear_frames(exc: BaseException | None) -> None:
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


def _no_such_bucket(e: BaseException) -> bool:
    code, _ = error_code(e)
    return code == "NoSuchBucket" or "bucket does not exist" in str(e).lower()


def _internal(key: str) -> bool:
    name = key.rsplit("/", 1)[-1]
    return name.startswith(".tmp-") or name.endswith(".lock")


def _s3_defaults(opts: dict[str, Any], options: StoreOptions) -> dict[str, Any]:
    """Per-request timeouts and no botocore-level retries, unless the caller set them."""
    opts = dict(opts)
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("connect_timeout", options.connect_timeout)
    config.setdefault("read_timeout", options.read_timeout)
    config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
    opts["config_kwargs"] = config
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if (
        endpoint
        and "endpoint_url" not in opts
        and "endpoint_url" not in opts.get("client_kwargs", {})
    ):
        opts["endpoint_url"] = endpoint
    # A store instance of our own: fsspec's shared instances would share our settings.
    opts.setdefault("skip_instance_cache", True)
    # Listings are cached by default, and a cached listing would answer HEADs wrongly.
    opts.setdefault("use_listings_cache", False)
    return opts
