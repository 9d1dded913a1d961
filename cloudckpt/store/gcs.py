"""``gs://`` (Google Cloud Storage and servers that speak its JSON API): gcsfs for the
session and credentials, and the requests of the commit protocol made here, one attempt
each, so that the store's retry policy is the only one.

The conditional writes are ``ifGenerationMatch`` uploads: ``0`` creates only if absent,
``<generation>`` replaces only if unchanged (412 otherwise); an object's generation is its
ETag. They go up as ``uploadType=multipart`` (metadata and bytes in one request), the
upload every GCS server checks preconditions on. Blobs of two parts or more go up as
resumable uploads, one retried request per part.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import os
import urllib.parse
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from fsspec.asyn import sync
from gcsfs.core import GCSFileSystem

from cloudckpt import redact
from cloudckpt.errors import PreconditionFailed, StoreError
from cloudckpt.store.backend import Buffer, ObjectInfo, RetriedCall, root_exists
from cloudckpt.store.fsspec_generic import FsspecBackend
from cloudckpt.store.options import StoreOptions

__all__ = ["GCSBackend", "GCSError"]

#: Resumable upload parts must be multiples of 256 KiB (all but the last).
_PART_ALIGN = 256 * 1024
#: Reasons GCS gives with a status; the store's retry policy reads them as S3 codes.
_REASONS = {408: "RequestTimeout", 429: "SlowDown", 503: "ServiceUnavailable"}


class GCSError(OSError):
    """A GCS request answered with an error status (``status``).

    ``response`` has the shape ``retry.error_code`` reads, so that 429, 408 and 5xx
    are retried and the rest fail at once, as on S3.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.response = {
            "Error": {"Code": _REASONS.get(status, str(status))},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }


class GCSBackend(FsspecBackend):
    """A bucket prefix on Google Cloud Storage (see ``backend.Backend``).

    ``storage_options`` go to gcsfs's ``GCSFileSystem`` as given (``token``, ``project``,
    ``endpoint_url``...); credentials are found as gcsfs finds them (``token``, else
    Application Default Credentials: ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
    application-default login``, the metadata server). ``STORAGE_EMULATOR_HOST``, or an
    ``http://`` ``endpoint_url``, is an emulator: anonymous unless a ``token`` is given.
    """

    remote = True

    def __init__(
        self, uri: str, protocol: str, storage_options: dict[str, Any], options: StoreOptions
    ) -> None:
        opts = dict(storage_options)
        plain_http = str(opts.get("endpoint_url", "")).startswith("http://")
        if os.environ.get("STORAGE_EMULATOR_HOST") or plain_http:  # an emulator
            opts.setdefault("token", "anon")
        # A file system of our own (fsspec's shared instances would share our settings).
        opts.setdefault("skip_instance_cache", True)
        self.uri = uri
        self.options = options
        # gcsfs's GCSFileSystem, not the "gs" entry of fsspec's registry: gcsfs 2026.x
        # registers ExtendedGcsFileSystem there, which first asks each bucket's layout
        # over gRPC (60 s lost per bucket where that API is absent, as on emulators).
        self.fs = GCSFileSystem(**opts)
        self.root = self.fs._strip_protocol(uri).rstrip("/")
        self.bucket = self.root.split("/", 1)[0]
        self.endpoint = _endpoint_name(self.fs._location)
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=options.connect_timeout, sock_read=options.read_timeout
        )

    # -- one request -----------------------------------------------------------------
    def _object_url(self, key: str, upload: bool = False) -> str:
        name = self.path(key).split("/", 1)[1]
        base = f"{self.fs._location}/{'upload/' if upload else ''}storage/v1/b/"
        bucket = urllib.parse.quote(self.bucket, safe="")
        if upload:
            return f"{base}{bucket}/o"
        return f"{base}{bucket}/o/{urllib.parse.quote(name, safe='')}"

    async def _send(
        self,
        method: str,
        url: str,
        what: str,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> tuple[int, Any, bytes]:
        """One request; an error status raised as FileNotFoundError (404),
        PermissionError (401, 403) or GCSError, naming ``what`` (never a credential)."""
        fs = self.fs
        session = await fs._set_session()
        if getattr(session, "_retry_connection", False):
            # aiohttp sends a PUT again, blind, when the connection drops: a resumable
            # part must instead resume from what the server stored (``_send_part``).
            session._retry_connection = False
        async with session.request(
            method,
            url,
            params=params,
            headers=fs._get_headers(headers),
            data=data,
            timeout=self._timeout,
            allow_redirects=False,  # 308 is "resume incomplete" on an upload session
        ) as resp:
            body = await resp.read()
            if resp.status < 400:
                return resp.status, resp.headers, body
        raise _error(resp.status, body, what, self.endpoint)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return sync(self.fs.loop, fn, *args)

    def _url_of(self, key: str) -> str:
        return f"gs://{self.path(key)}"

    async def _upload(self, key: str, data: Buffer, generation: str | None) -> dict[str, Any]:
        """A multipart upload (metadata and bytes in one request); with ``generation``,
        only if the object's generation is still that (``"0"``: only if absent)."""
        boundary = f"cloudckpt-{uuid.uuid4().hex}"
        name = self.path(key).split("/", 1)[1]
        head = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': name})}\r\n--{boundary}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body = b"".join((head, data, f"\r\n--{boundary}--\r\n".encode()))
        params = {"uploadType": "multipart"}
        if generation is not None:
            params["ifGenerationMatch"] = generation
        _, _, out = await self._send(
            "POST",
            self._object_url(key, upload=True),
            self._url_of(key),
            params=params,
            headers={"Content-Type": f"multipart/related; boundary={boundary}"},
            data=body,
        )
        return json.loads(out)  # type: ignore[no-any-return]

    async def _metadata(self, key: str) -> tuple[dict[str, Any], Any]:
        _, headers, body = await self._send("GET", self._object_url(key), self._url_of(key))
        return json.loads(body), headers

    # -- the backend -----------------------------------------------------------------
    def get(self, key: str, most: int | None = None) -> bytes | memoryview:
        if most is not None and most <= 0:
            if self.stat(key) is None:
                raise FileNotFoundError(f"{self._url_of(key)} does not exist")
            return b""
        headers = None if most is None else {"Range": f"bytes=0-{most - 1}"}

        async def _get() -> bytes:
            try:
                _, _, body = await self._send(
                    "GET",
                    self._object_url(key),
                    self._url_of(key),
                    params={"alt": "media"},
                    headers=headers,
                )
            except GCSError as e:
                if e.status == 416:  # a range from byte 0 of an empty object
                    return b""
                raise
            return body

        return self._run(_get)  # type: ignore[no-any-return]

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            meta, _ = self._run(self._metadata, key)
        except FileNotFoundError:
            return None
        return ObjectInfo(int(meta.get("size") or 0), _timestamp(meta.get("updated")))

    def put(self, key: str, data: Buffer, call: RetriedCall) -> None:
        if len(data) >= 2 * self.options.part_size:
            self._put_resumable(key, data, call)
        else:
            call("put", key, lambda: self._run(self._upload, key, data, None))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._run(self._upload, key, data, "0")
        except GCSError as e:
            if e.status == 412:
                return False
            raise
        return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        async def _get() -> tuple[bytes, str]:
            _, headers, body = await self._send(
                "GET", self._object_url(key), self._url_of(key), params={"alt": "media"}
            )
            return body, headers["X-Goog-Generation"]

        try:
            return self._run(_get)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        try:
            out = self._run(self._upload, key, data, "0" if etag is None else etag)
        except GCSError as e:
            if e.status == 412:
                raise PreconditionFailed(
                    f"{self._url_of(key)} changed under us (expected generation {etag})"
                ) from None
            raise
        return str(out["generation"])

    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        """Every object at or under ``prefix`` taken as a directory (as fsspec's find)."""
        full = self.path(prefix).rstrip("/")
        name = full.split("/", 1)[1] if "/" in full else ""
        url = f"{self.fs._location}/storage/v1/b/{urllib.parse.quote(self.bucket, safe='')}/o"

        async def _list() -> dict[str, ObjectInfo]:
            found: dict[str, ObjectInfo] = {}
            params = {"prefix": name, "fields": "items(name,size,updated),nextPageToken"}
            while True:
                _, _, body = await self._send("GET", url, f"gs://{full}/", params=params)
                page = json.loads(body)
                for item in page.get("items", []):
                    if item["name"] == name or item["name"].startswith(name + "/"):
                        key = f"{self.bucket}/{item['name']}"[len(self.root) + 1 :]
                        found[key] = ObjectInfo(
                            int(item.get("size") or 0), _timestamp(item.get("updated"))
                        )
                if not page.get("nextPageToken"):
                    return found
                params["pageToken"] = page["nextPageToken"]

        return self._run(_list)  # type: ignore[no-any-return]

    def delete(self, keys: list[str], guard: Callable[[], None] | None) -> None:
        for key in keys:  # one request each: guard each
            if guard is not None:
                guard()
            with contextlib.suppress(FileNotFoundError):
                self._run(self._send, "DELETE", self._object_url(key), self._url_of(key))

    def age(self, key: str) -> float | None:
        """One metadata GET: its ``Date`` (the server's clock) against ``updated``."""
        try:
            meta, headers = self._run(self._metadata, key)
        except FileNotFoundError:
            return None
        now = email.utils.parsedate_to_datetime(headers["Date"]).timestamp()
        return now - int(_timestamp(meta.get("updated")))  # ``Date`` has whole seconds

    def abort_stale_writes(self, older_than: float, call: RetriedCall) -> int:
        """Nothing to remove: a resumable upload leaves no object until its last part,
        a failed one is cancelled by its writer, and GCS expires the sessions of killed
        writers on its own (after a week); the sessions cannot be listed."""
        return 0

    def check_root(self, call: RetriedCall) -> None:
        """One bucket GET: a missing bucket must not look like an empty repository."""
        url = f"{self.fs._location}/storage/v1/b/{urllib.parse.quote(self.bucket, safe='')}"

        def _get_bucket() -> bool:
            where = f"gs://{self.bucket}"
            return root_exists(lambda: self._run(self._send, "GET", url, where, {"fields": "name"}))

        if not call("get-bucket", "", _get_bucket):
            raise self._missing_bucket()

    def missing_root(self, error: BaseException) -> StoreError | None:
        missing = "bucket does not exist" in str(error).lower()
        return self._missing_bucket() if missing else None

    def _missing_bucket(self) -> StoreError:
        return StoreError(
            f"bucket {self.bucket!r} does not exist{self.endpoint}: create it (for example "
            f"`gcloud storage buckets create gs://{self.bucket}`), or check the URI "
            f"{redact.redact(self.uri)!r} and the project the credentials belong to"
        )

    # -- large blobs -----------------------------------------------------------------
    def _put_resumable(self, key: str, data: Buffer, call: RetriedCall) -> None:
        """A resumable upload, one retried request per part."""
        size = len(data)
        part = max(_PART_ALIGN, self.options.part_size // _PART_ALIGN * _PART_ALIGN)
        view = memoryview(data).cast("B")
        session = call("start-upload", key, lambda: self._run(self._start_resumable, key, size))
        tried: set[int] = set()
        try:
            for start in range(0, size, part):
                end = min(start + part, size)
                call(
                    "upload-part",
                    key,
                    lambda s=start, e=end: self._run(
                        self._send_part, session, key, view, s, e, tried
                    ),
                )
        except BaseException:
            # Cancel the session (if this fails too, GCS expires it after a week).
            with contextlib.suppress(Exception):
                self._run(self._send, "DELETE", session, self._url_of(key))
            raise

    async def _start_resumable(self, key: str, size: int) -> str:
        name = self.path(key).split("/", 1)[1]
        _, headers, _ = await self._send(
            "POST",
            self._object_url(key, upload=True),
            self._url_of(key),
            params={"uploadType": "resumable"},
            headers={
                "Content-Type": "application/json; charset=UTF-8",
                "X-Upload-Content-Type": "application/octet-stream",
                "X-Upload-Content-Length": str(size),
            },
            data=json.dumps({"name": name}).encode(),
        )
        return str(headers["Location"])

    async def _send_part(
        self, session: str, key: str, view: memoryview, start: int, end: int, tried: set[int]
    ) -> None:
        """Send ``view[start:end]``. Again after a failed attempt, first ask the session
        how far it got: the answer to a part it kept may have been lost, and a part must
        start where the stored bytes end."""
        size = len(view)
        if start in tried:
            status, headers, _ = await self._send(
                "PUT", session, self._url_of(key), headers={"Content-Range": f"bytes */{size}"}
            )
            if status in (200, 201):
                return  # the last part arrived: the object is complete
            stored = headers.get("Range")  # "bytes=0-N", absent when nothing is stored
            start = max(start, int(stored.rsplit("-", 1)[1]) + 1 if stored else 0)
            if start >= end:
                return
        tried.add(start)
        await self._send(
            "PUT",
            session,
            self._url_of(key),
            headers={"Content-Range": f"bytes {start}-{end - 1}/{size}"},
            data=view[start:end],
        )


def _error(status: int, body: bytes, what: str, endpoint: str) -> OSError:
    """The exception of an error answer: the server's message, the object, the endpoint."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace").strip()
    text = f"{what}{endpoint}: HTTP {status}: {message}"
    if status == 404:
        return FileNotFoundError(text)
    if status in (401, 403):
        return PermissionError(
            f"{text} (check the credentials: `token` in storage_options or "
            "GOOGLE_APPLICATION_CREDENTIALS, and their roles on the bucket)"
        )
    return GCSError(status, text)


def _timestamp(rfc3339: str | None) -> float:
    if not rfc3339:
        return 0.0
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _endpoint_name(location: str) -> str:
    """`` (endpoint scheme://host:port)`` for messages: never userinfo, path or query."""
    try:
        url = urllib.parse.urlsplit(location)
    except ValueError:
        return " (endpoint: unparsable endpoint_url)"
    if url.hostname in ("storage.googleapis.com", "www.googleapis.com"):
        return " (endpoint: Google Cloud Storage)"
    port = f":{url.port}" if url.port else ""
    return f" (endpoint {url.scheme}://{url.hostname}{port})"
