"""``s3://`` (AWS S3 and S3-compatible servers): s3fs for control calls, obstore for blob
bytes and for the conditional writes of the commit protocol (``If-None-Match: *`` /
``If-Match`` PUTs; ``s3_transport``), per-part retried multipart uploads
(``s3_multipart``).
"""

from __future__ import annotations

import email.utils
import os
import urllib.parse
from collections.abc import Callable
from typing import Any

from fsspec.asyn import sync

from cloudckpt import redact
from cloudckpt.errors import PreconditionFailed, StoreError
from cloudckpt.store import s3_multipart, s3_transport
from cloudckpt.store.backend import Buffer, ObjectInfo, RetriedCall, clear_frames, root_exists
from cloudckpt.store.fsspec_generic import FsspecBackend
from cloudckpt.store.options import StoreOptions
from cloudckpt.store.retry import error_code
from cloudckpt.store.s3_transport import ObstoreTransport

__all__ = ["S3Backend"]


class S3Backend(FsspecBackend):
    """A bucket prefix on S3 (see ``backend.Backend``).

    ``storage_options`` go to s3fs as given (``endpoint_url``, ``key``, ``secret``,
    ``client_kwargs``...), with cloudckpt's timeouts and no retries of s3fs's or
    botocore's own: one retry budget, the store's.
    """

    remote = True

    def __init__(
        self, uri: str, protocol: str, storage_options: dict[str, Any], options: StoreOptions
    ) -> None:
        opts = _s3_defaults(storage_options, options)
        super().__init__(uri, protocol, opts, options)
        self.fs.retries = 1
        self.endpoint = _endpoint_name(opts)
        #: The obstore transport of blob bytes (None: s3fs carries them).
        self.transport: ObstoreTransport | None = None
        if options.fast_path:
            self.transport = ObstoreTransport.for_s3(
                self.root, opts, options.connect_timeout, options.read_timeout
            )
            if self.transport is not None and self.transport.endpoint:  # from a profile
                self.endpoint = _endpoint_name({"endpoint_url": self.transport.endpoint})

    def _usable_transport(self) -> ObstoreTransport | None:
        usable = self.transport is not None and s3_transport.usable()
        return self.transport if usable else None

    def _call(self, method: str, key: str, **kwargs: Any) -> Any:
        bucket, path, _ = self.fs.split_path(self.path(key))
        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=bucket, Key=path, **kwargs)

    def get(self, key: str, most: int | None = None) -> bytes | memoryview:
        transport = self._usable_transport()
        if transport is not None:
            return transport.get(key, most)
        # s3fs would first HEAD (and on a miss, LIST) every object it reads in parallel
        # parts; blobs are read whole and in parallel with each other, so one GET each.
        path = self.path(key)
        if most is None:
            return self.fs.cat_file(path, max_concurrency=1)  # type: ignore[no-any-return]
        return _empty_if_unsatisfiable(
            lambda: self.fs.cat_file(path, start=0, end=most, max_concurrency=1)
        )

    def stat(self, key: str) -> ObjectInfo | None:
        transport = self._usable_transport()
        if transport is None:
            return super().stat(key)
        found = transport.head(key)
        return None if found is None else ObjectInfo(*found)

    def put(self, key: str, data: Buffer, call: RetriedCall) -> None:
        path = self.path(key)
        if len(data) >= 2 * self.options.part_size:
            s3_multipart.upload(
                self.fs, path, data, self.options.part_size, lambda w, fn: call(w, key, fn)
            )
            return
        transport = self._usable_transport()
        if transport is None:
            super().put(key, data, call)
        else:
            call("put", key, lambda: transport.put(key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._put_if(key, data, None)
        except (FileExistsError, OSError) as e:
            if isinstance(e, FileExistsError) or _lost_race(e):
                return False
            raise
        return True

    def _put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """A conditional PUT (absent, or this ETag); the new ETag."""
        transport = self._usable_transport()
        if transport is not None:
            return transport.put_if(key, data, etag)
        cond = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        out = self._call("put_object", key, Body=data, **cond)
        self.fs.invalidate_cache(self.path(key))
        return out["ETag"]  # type: ignore[no-any-return]

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        transport = self._usable_transport()
        if transport is not None:
            return transport.get_versioned(key)
        bucket, path, _ = self.fs.split_path(self.path(key))

        async def _get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=path)
            async with resp["Body"] as body:
                data = await body.read()
            return data, resp["ETag"]

        try:
            return sync(self.fs.loop, _get)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        try:
            return self._put_if(key, data, etag)
        except OSError as e:
            if isinstance(e, FileExistsError) or _lost_race(e):
                raise PreconditionFailed(
                    f"{self.path(key)} changed under us (expected ETag {etag})"
                ) from None
            raise

    def delete(self, keys: list[str], guard: Callable[[], None] | None) -> None:
        if guard is not None:
            guard()
        self.fs.rm([self.path(k) for k in keys])  # one DeleteObjects; absent keys are fine

    def age(self, key: str) -> float | None:
        """One HEAD: its ``Date`` (the server's clock) against its ``Last-Modified``."""
        try:
            resp = self._call("head_object", key)
        except FileNotFoundError as e:
            clear_frames(e)
            return None
        date = resp["ResponseMetadata"]["HTTPHeaders"]["date"]
        now = email.utils.parsedate_to_datetime(date).timestamp()
        return now - resp["LastModified"].timestamp()  # type: ignore[no-any-return]

    def abort_stale_writes(self, older_than: float, call: RetriedCall) -> int:
        """Abort the incomplete multipart uploads killed writers left."""
        stale = call(
            "list-uploads",
            "",
            lambda: s3_multipart.stale_uploads(self.fs, self.root, older_than),
        )
        for path, upload_id in stale:
            key = path[len(self.root) + 1 :]
            call(
                "abort-upload",
                key,
                lambda p=path, u=upload_id: s3_multipart.abort(self.fs, p, u),
            )
        return len(stale)

    def check_root(self, call: RetriedCall) -> None:
        """One HeadBucket: a missing bucket must not look like an empty repository."""
        bucket = self.root.split("/", 1)[0]

        def _head_bucket() -> bool:
            return root_exists(
                lambda: sync(self.fs.loop, self.fs._call_s3, "head_bucket", Bucket=bucket)
            )

        if not call("head-bucket", "", _head_bucket):
            raise self._missing_bucket()

    def missing_root(self, error: BaseException) -> StoreError | None:
        code, _ = error_code(error)
        missing = code == "NoSuchBucket" or "bucket does not exist" in str(error).lower()
        return self._missing_bucket() if missing else None

    def _missing_bucket(self) -> StoreError:
        bucket = self.root.split("/", 1)[0]
        return StoreError(
            f"bucket {bucket!r} does not exist{self.endpoint}: create it (for example "
            f"`aws s3 mb s3://{bucket}`), or check the URI {redact.redact(self.uri)!r} and the "
            "endpoint"
        )


def _lost_race(exc: BaseException) -> bool:
    code, status = error_code(exc)
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _empty_if_unsatisfiable(read: Callable[[], bytes]) -> bytes:
    """A ranged read from byte 0 that S3 refuses as unsatisfiable (416 InvalidRange)
    means an empty object."""
    try:
        return read()
    except OSError as e:
        code, status = error_code(e)
        if code == "InvalidRange" or status == 416:
            clear_frames(e)
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
