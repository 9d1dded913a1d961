"""An object store at a URI: plain and conditional writes, with retries.

Keys are ``/``-separated paths relative to the store's root URI. ``Store`` is what every
kind of store shares -- key checks, retries and deadlines, error translation, redaction
-- around a backend chosen once from the URI's scheme (``cloudckpt.store.backend``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import fsspec

from cloudckpt import redact
from cloudckpt.errors import (
    CheckpointNotFound,
    CloudCkptError,
    CorruptCheckpoint,
    InvalidKey,
    StoreError,
)
from cloudckpt.store.backend import Backend, Buffer, ObjectInfo, open_backend
from cloudckpt.store.options import StoreOptions
from cloudckpt.store.retry import RetryPolicy, is_retryable, refused

__all__ = ["ObjectInfo", "RetryPolicy", "Store", "StoreOptions", "check_key"]

log = logging.getLogger("cloudckpt.store")
T = TypeVar("T")
_DELETE_BATCH = 500


class Store:
    """The objects under one root URI (``s3://bucket/prefix``, ``file:///dir``, ``memory://x``).

    ``storage_options`` are passed to fsspec exactly as the backend takes them (for S3:
    ``endpoint_url``, ``key``, ``secret``, ``client_kwargs``...); the standard AWS
    environment (``AWS_ENDPOINT_URL``, credentials, profile) applies as usual. The kind
    of store is chosen once, from the scheme (``cloudckpt.store.backend.BACKENDS``).
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
        opts = dict(storage_options or {})
        redact.remember(opts)
        #: The requests of this kind of store (``backend.Backend``).
        self.backend: Backend = open_backend(self.uri, opts, self.options)
        #: The fsspec file system and the root path in it, for what no store call covers.
        self.fs = self.backend.fs
        self.root = self.backend.root
        self._root_checked = False

    def __repr__(self) -> str:
        return f"Store({redact.redact(self.uri)!r})"

    def path(self, key: str) -> str:
        """The file system path of ``key`` (``fs`` names it so)."""
        check_key(key)
        return self.backend.path(key)

    def url(self, key: str) -> str:
        return f"{self.uri}/{key}"

    # -- the calls -----------------------------------------------------------------
    def _run(self, what: str, key: str, fn: Callable[[], T]) -> T:
        check_key(key)
        endpoint = self.backend.endpoint
        try:
            # Over the network each attempt is watched: a retry running past the call's
            # deadline, or a call of a transfer that failed elsewhere, is left behind.
            return self.options.retry.call(fn, f"{what} {self.url(key)}", watch=self.backend.remote)
        except CloudCkptError:
            raise  # ours already (not found, lost race, a guard that stopped the call)
        except FileNotFoundError as e:
            missing = self.backend.missing_root(e)
            if missing is not None:
                raise missing from e
            raise CheckpointNotFound(f"{self.url(key)} does not exist") from e
        except PermissionError as e:
            missing = self.backend.missing_root(e)
            if missing is not None:
                raise missing from e
            raise StoreError(
                f"access denied for {what} {self.url(key)}{endpoint}: check the "
                "credentials and the bucket policy for this prefix"
            ) from e
        except Exception as e:
            raise StoreError(
                redact.redact(
                    f"{what} {self.url(key)}{endpoint} failed: {type(e).__name__}: {e} ({_hint(e)})"
                )
            ) from e

    def check_root(self) -> None:
        """Raise StoreError naming the bucket and the endpoint if the store's bucket does
        not exist (S3: one HeadBucket per handle; other stores create their root on the
        first write). A missing bucket must not look like an empty repository."""
        if not self._root_checked:
            self.backend.check_root(self._run)
            self._root_checked = True

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
            return self._run("get", key, lambda: self.backend.get(key))
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        found = self._run("get", key, lambda: self.backend.get(key, limit + 1))
        if len(found) > limit:
            raise CorruptCheckpoint(
                f"{self.url(key)} is longer than the {limit} bytes expected of it"
            )
        return found

    @property
    def in_place(self) -> bool:
        """Whether objects are files on this machine's disk, read in place
        (:meth:`read_into`)."""
        return self.backend.in_place

    def read_into(self, key: str, buffers: list[memoryview]) -> bool:
        """Fill ``buffers`` in order with the object's bytes, without a copy, if it is
        exactly as long as they are together (one open: size, then reads); False if it
        is not, or changed meanwhile -- and always where objects are not files on this
        machine's disk (not :attr:`in_place`): read those whole."""
        if not self.backend.in_place:
            return False
        return self._run("get", key, lambda: self.backend.read_into(key, buffers))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object."""
        return self._run("get", key, lambda: self.fs.cat_file(self.path(key), start=start, end=end))

    def stat(self, key: str) -> ObjectInfo | None:
        """Size and modification time, or None if the object does not exist (one HEAD)."""
        return self._run("head", key, lambda: self.backend.stat(key))

    def put(self, key: str, data: Buffer) -> None:
        """Write the object whole (readers never see a partial object)."""
        check_key(key)
        self.backend.put(key, data, self._run)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Write only if no object is at ``key``; False if another object was already there.

        An object with exactly these bytes counts as ours: a retried create whose first
        attempt took effect but lost its response finds it there.
        """
        if self._run("create", key, lambda: self.backend.put_if_absent(key, data)):
            return True
        found = self._run("get", key, lambda: self.backend.read_versioned(key))
        return found is not None and found[0] == bytes(data)

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag, or None if absent (for compare-and-swap)."""
        return self._run("get", key, lambda: self.backend.read_versioned(key))

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        """Replace the object only if its ETag is still ``etag`` (None: only if absent).

        Returns the new ETag; raises PreconditionFailed if another writer won.
        """
        return self._run("swap", key, lambda: self.backend.put_if_match(key, data, etag))

    def list_keys(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted."""
        return sorted(self.list_info(prefix))

    def list_info(self, prefix: str = "") -> dict[str, ObjectInfo]:
        """Key -> size and modification time of every object under ``prefix``."""
        return self._run("list", prefix, lambda: self.backend.list_info(prefix))

    def abort_stale_uploads(self, older_than: float) -> int:
        """Abort the writes killed writers left behind, started before ``older_than``
        (seconds since the epoch, by the store's clock): incomplete multipart uploads on
        S3, temporary files on ``file://``. Returns how many."""
        return self.backend.abort_stale_writes(older_than, self._run)

    def delete(self, keys: Iterable[str], guard: Callable[[], None] | None = None) -> None:
        """Remove objects; one already gone is not an error (another process deleted it).

        ``guard`` runs before every attempt of every request and may raise to stop
        (a garbage collection whose sweep may have expired must not delete)."""
        keys = list(keys)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            for key in batch:
                self.path(key)  # checked, and confined to the root, before any request
            self._run("delete", batch[0], lambda b=batch: self.backend.delete(b, guard))

    def age(self, key: str) -> float | None:
        """Seconds since the object was last written, by the store's clock (None if it
        does not exist): on S3 one HEAD, its ``Date`` against its ``Last-Modified``; on
        local files against the time of a file written now (on a network file system, the
        server's clock); in memory against this process's clock."""
        return self._run("head", key, lambda: self.backend.age(key))


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


def _hint(e: Exception) -> str:
    """What to check, for a call that failed for good."""
    if refused(e):
        return (
            "nothing is listening at the endpoint: check endpoint_url (or "
            "AWS_ENDPOINT_URL) and that the server is running"
        )
    if is_retryable(e):
        return "the store kept failing; retry later or raise RetryPolicy limits"
    if "NoCredentials" in type(e).__name__:
        return (
            "no credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, or pass key/secret in storage_options"
        )
    return "check the URI, the endpoint and storage_options"
