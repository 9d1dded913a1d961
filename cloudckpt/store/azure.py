"""``az://`` and ``abfs://`` (Azure Blob Storage): adlfs for the file system, its async
``BlobServiceClient`` for every request, and the conditional writes of the commit
protocol as ``If-None-Match: *`` / ``If-Match`` on Put Blob. Large blobs are block blobs:
blocks staged one retried request each, then one Put Block List.
"""

from __future__ import annotations

import base64
import email.utils
import errno
import os
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import fsspec
from fsspec.asyn import sync

from cloudckpt import redact
from cloudckpt.errors import PreconditionFailed, StoreError
from cloudckpt.store.backend import Buffer, ObjectInfo, RetriedCall, clear_frames, root_exists
from cloudckpt.store.fsspec_generic import FsspecBackend
from cloudckpt.store.options import StoreOptions

__all__ = ["AzureBackend"]

T = TypeVar("T")
#: Statuses and error codes that mean "try again later" on Azure Storage.
_TRANSIENT_STATUS = {408: errno.ETIMEDOUT, 429: errno.EBUSY, 500: errno.EREMOTEIO}
_TRANSIENT_STATUS |= {502: errno.EREMOTEIO, 503: errno.EBUSY, 504: errno.ETIMEDOUT}
_TRANSIENT_CODES = {"ServerBusy", "OperationTimedOut", "InternalError"}
#: Above this the SDK would split a Put Blob into blocks itself: we stage them instead.
_SINGLE_PUT_MAX = 64 * 1024 * 1024


class AzureBackend(FsspecBackend):
    """A container prefix on Azure Blob Storage (see ``backend.Backend``).

    ``storage_options`` go to adlfs as given (``account_name`` with ``account_key``,
    ``sas_token`` or ``credential``; or ``connection_string``; none: the
    ``AZURE_STORAGE_*`` environment, then ``DefaultAzureCredential``), with cloudckpt's
    timeouts and no retries of the Azure SDK's own: one retry budget, the store's.
    """

    remote = True

    def __init__(
        self, uri: str, protocol: str, storage_options: dict[str, Any], options: StoreOptions
    ) -> None:
        # ``abfs://container@account.dfs.core.windows.net/prefix`` names the account too.
        found = fsspec.get_filesystem_class(protocol)._get_kwargs_from_urls(uri)
        opts = {**found, **storage_options}
        opts.setdefault("skip_instance_cache", True)
        opts.setdefault("connection_timeout", options.connect_timeout)
        opts.setdefault("read_timeout", options.read_timeout)
        _remember_secrets(opts)
        super().__init__(uri, protocol, opts, options)
        #: Per-request settings: the SDK retries nothing (``Store`` does), and times out.
        self._request: dict[str, Any] = {
            "retry_total": 0,
            "connection_timeout": options.connect_timeout,
            "read_timeout": options.read_timeout,
        }
        self.container = self.root.split("/", 1)[0]
        self.endpoint = _endpoint_name(self.fs.service_client.url)

    def _sync(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            return sync(self.fs.loop, make)  # type: ignore[no-any-return]
        except Exception as e:
            translated = _translate(e)
            if translated is e:
                raise
            clear_frames(e)
            raise translated from e

    def _blob(self, key: str) -> Any:
        return self.fs.service_client.get_blob_client(self.container, self._name(key))

    def _name(self, key: str) -> str:
        return self.path(key).split("/", 1)[1]

    def get(self, key: str, most: int | None = None) -> bytes | memoryview:
        if most == 0:  # Azure has no empty range
            if self.stat(key) is None:
                raise FileNotFoundError(f"{self.path(key)} does not exist")
            return b""

        async def _get() -> bytes:
            stream = await self._blob(key).download_blob(
                offset=0 if most else None, length=most, max_concurrency=1, **self._request
            )
            return await stream.readall()  # type: ignore[no-any-return]

        try:
            return self._sync(_get)
        except OSError as e:
            if most and _status(e) == 416:  # a range of an empty blob
                clear_frames(e)
                return b""
            raise

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            props = self._sync(lambda: self._blob(key).get_blob_properties(**self._request))
        except FileNotFoundError as e:
            clear_frames(e)
            return None
        return ObjectInfo(int(props.size), props.last_modified.timestamp())

    def put(self, key: str, data: Buffer, call: RetriedCall) -> None:
        if len(data) < min(2 * self.options.part_size, _SINGLE_PUT_MAX):
            body = data.tobytes() if isinstance(data, memoryview) else bytes(data)
            call("put", key, lambda: self._upload(key, body, overwrite=True))
            return
        # A block blob: each block its own retried request, then one commit. The blocks
        # of an upload that never commits stay invisible (no listing or read sees them):
        # gc discards them once abandoned (``abort_stale_writes``), Azure a week after
        # the last one was staged. A failed upload leaves them: discarding now could
        # discard the blocks another writer of the same blob is staging.
        view = memoryview(data)
        upload = uuid.uuid4().hex
        blocks = []
        for number, start in enumerate(range(0, len(view), self.options.part_size), 1):
            block_id = base64.b64encode(f"{upload}-{number:06d}".encode()).decode()
            body = bytes(view[start : start + self.options.part_size])
            call(
                f"stage-block {number}",
                key,
                lambda b=block_id, d=body: self.stage_block(key, b, d),  # type: ignore[misc]
            )
            blocks.append(block_id)
        call("commit-blocks", key, lambda: self.commit_block_list(key, blocks))

    def stage_block(self, key: str, block_id: str, data: bytes) -> None:
        """Put Block: one block of a block blob, invisible until committed."""
        self._sync(lambda: self._blob(key).stage_block(block_id, data, **self._request))

    def commit_block_list(self, key: str, blocks: list[str]) -> None:
        """Put Block List: the blob becomes these staged blocks, atomically."""
        self._sync(lambda: self._blob(key).commit_block_list(blocks, **self._request))

    def _upload(self, key: str, body: bytes, **conditions: Any) -> dict[str, Any]:
        return self._sync(  # type: ignore[no-any-return]
            lambda: self._blob(key).upload_blob(
                body, blob_type="BlockBlob", max_concurrency=1, **conditions, **self._request
            )
        )

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._upload(key, data, overwrite=False)  # If-None-Match: *
        except (FileExistsError, PreconditionFailed):
            return False
        return True

    def read_versioned(self, key: str) -> tuple[bytes, str] | None:
        async def _get() -> tuple[bytes, str]:
            stream = await self._blob(key).download_blob(max_concurrency=1, **self._request)
            return await stream.readall(), stream.properties.etag

        try:
            return self._sync(_get)
        except FileNotFoundError as e:
            clear_frames(e)
            return None

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> str:
        from azure.core import MatchConditions

        if etag is None:
            cond: dict[str, Any] = {"overwrite": False}
        else:
            cond = {
                "overwrite": True,
                "etag": etag,
                "match_condition": MatchConditions.IfNotModified,
            }
        try:
            out = self._upload(key, data, **cond)
        except (FileExistsError, PreconditionFailed, FileNotFoundError) as e:
            if self.missing_root(e) is not None:
                raise
            clear_frames(e)
            raise PreconditionFailed(
                f"{self.path(key)} changed under us (expected ETag {etag})"
            ) from None
        return out["etag"]  # type: ignore[no-any-return]

    def list_info(self, prefix: str) -> dict[str, ObjectInfo]:
        base = self.root[len(self.container) + 1 :] if "/" in self.root else ""

        async def _list() -> dict[str, ObjectInfo]:
            client = self.fs.service_client.get_container_client(self.container)
            found: dict[str, ObjectInfo] = {}
            name_prefix = f"{base}/{prefix}" if base else prefix
            async for blob in client.list_blobs(name_starts_with=name_prefix, **self._request):
                key = blob.name[len(base) + 1 :] if base else blob.name
                found[key] = ObjectInfo(int(blob.size), blob.last_modified.timestamp())
            return found

        try:
            return self._sync(_list)
        except FileNotFoundError as e:
            if self.missing_root(e) is not None:
                raise
            clear_frames(e)
            return {}

    def delete(self, keys: list[str], guard: Callable[[], None] | None) -> None:
        for key in keys:  # one request each: guard each
            if guard is not None:
                guard()
            try:
                self._sync(lambda k=key: self._blob(k).delete_blob(**self._request))  # type: ignore[misc]
            except FileNotFoundError as e:
                if self.missing_root(e) is not None:
                    raise
                clear_frames(e)

    def age(self, key: str) -> float | None:
        """One Get Blob Properties: its ``Date`` (the server's clock) against its
        ``Last-Modified``."""
        dates: list[str] = []

        def _hook(response: Any) -> None:
            dates.append(response.http_response.headers.get("Date", ""))

        try:
            props = self._sync(
                lambda: self._blob(key).get_blob_properties(
                    raw_response_hook=_hook, **self._request
                )
            )
        except FileNotFoundError as e:
            clear_frames(e)
            return None
        now = email.utils.parsedate_to_datetime(dates[-1]).timestamp()
        return now - props.last_modified.timestamp()  # type: ignore[no-any-return]

    def abort_stale_writes(self, older_than: float, call: RetriedCall) -> int:
        """Discard the uncommitted blocks of uploads killed writers left, last staged
        before ``older_than``: Azure has no abort, but a Put Block List discards the
        blocks it does not name. So: commit an empty block list only if the blob is
        absent (a writer that committed it meanwhile keeps it), then delete that empty
        blob only if unchanged."""
        stale = call("list-uploads", "", lambda: self._sync(lambda: self._uncommitted(older_than)))
        for key in stale:
            call("abort-upload", key, lambda k=key: self._discard_blocks(k))  # type: ignore[misc]
        return len(stale)

    async def _uncommitted(self, older_than: float) -> list[str]:
        client = self.fs.service_client.get_container_client(self.container)
        base = self.root[len(self.container) + 1 :] + "/" if "/" in self.root else ""
        committed: set[str] = set()
        async for blob in client.list_blobs(name_starts_with=base, **self._request):
            committed.add(blob.name)
        stale = []
        async for blob in client.list_blobs(
            name_starts_with=base, include=["uncommittedblobs"], **self._request
        ):
            when = int(blob.last_modified.timestamp())  # whole seconds, as S3's
            if blob.name not in committed and when <= older_than:
                stale.append(blob.name[len(base) :])
        return stale

    def _discard_blocks(self, key: str) -> None:
        from azure.core import MatchConditions

        try:
            etag = self._sync(
                lambda: self._blob(key).commit_block_list(
                    [], match_condition=MatchConditions.IfMissing, **self._request
                )
            )["etag"]
        except (FileExistsError, PreconditionFailed) as e:  # committed meanwhile: keep it
            clear_frames(e)
            return
        try:
            self._sync(
                lambda: self._blob(key).delete_blob(
                    etag=etag, match_condition=MatchConditions.IfNotModified, **self._request
                )
            )
        except (FileNotFoundError, PreconditionFailed) as e:  # gone, or rewritten: theirs
            clear_frames(e)

    def check_root(self, call: RetriedCall) -> None:
        """One Get Container Properties: a missing container must not look like an empty
        repository."""

        def _exists() -> bool:
            client = self.fs.service_client.get_container_client(self.container)
            return root_exists(
                lambda: self._sync(lambda: client.get_container_properties(**self._request))
            )

        if not call("get-container", "", _exists):
            raise self._missing_container()

    def missing_root(self, error: BaseException) -> StoreError | None:
        missing = any(getattr(e, "azure_code", None) == "ContainerNotFound" for e in _chain(error))
        return self._missing_container() if missing else None

    def _missing_container(self) -> StoreError:
        return StoreError(
            f"container {self.container!r} does not exist{self.endpoint}: create it (for "
            f"example `az storage container create --name {self.container}`), or check the "
            f"URI {redact.redact(self.uri)!r}, the account and the endpoint"
        )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _status(exc: BaseException) -> int | None:
    for e in _chain(exc):
        status = getattr(e, "status_code", None) or getattr(e, "azure_status", None)
        if isinstance(status, int):
            return status
    return None


def _translate(exc: Exception) -> BaseException:
    """The Python error the store's retry and error handling understand, for an Azure
    SDK error: not found, exists, lost race, denied, transient (an errno the retry
    policy retries) or a connection failure; anything else as it is."""
    from azure.core import exceptions as az

    if isinstance(exc, (az.ServiceRequestError, az.ServiceResponseError)):
        return ConnectionError(f"{type(exc).__name__}: {_first_line(exc)}")
    if not isinstance(exc, az.HttpResponseError):
        return exc
    status, code = exc.status_code, exc.error_code
    message = f"{code or 'HTTP ' + str(status)}: {_first_line(exc)}"
    out: OSError | PreconditionFailed
    if isinstance(exc, az.ResourceModifiedError) or status == 412:
        out = PreconditionFailed(message)
    elif isinstance(exc, az.ResourceExistsError) or status == 409:
        out = FileExistsError(errno.EEXIST, message)
    elif isinstance(exc, az.ResourceNotFoundError) or status == 404:
        out = FileNotFoundError(errno.ENOENT, message)
    elif isinstance(exc, az.ClientAuthenticationError) or status == 403:
        out = PermissionError(errno.EACCES, message)
    elif status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
        out = OSError(_TRANSIENT_STATUS.get(status or 0, errno.EBUSY), message)
    else:
        out = OSError(errno.EIO, message)
    out.azure_code = code  # type: ignore[union-attr]
    out.azure_status = status  # type: ignore[union-attr]
    return out


def _first_line(exc: BaseException) -> str:
    return redact.redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "")


def _endpoint_name(url: str) -> str:
    """`` (endpoint scheme://host:port/account)`` for messages: never a query (a SAS)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        return f" (endpoint {parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')})"
    except ValueError:
        return " (endpoint: unparsable account URL)"


def _remember_secrets(opts: dict[str, Any]) -> None:
    """Scrub the account key and SAS of a connection string (in ``opts`` or the
    environment) and ``AZURE_STORAGE_ACCOUNT_KEY`` from every message."""
    found: dict[str, str] = {}
    for conn in (opts.get("connection_string"), os.environ.get("AZURE_STORAGE_CONNECTION_STRING")):
        for part in str(conn or "").split(";"):
            name, _, value = part.partition("=")
            if name.strip().lower() in ("accountkey", "sharedaccesssignature") and value:
                found[f"{name}-{len(found)}"] = value
    found["env"] = os.environ.get("AZURE_STORAGE_ACCOUNT_KEY", "")
    redact.remember(opts)
    for value in found.values():
        redact.remember({"account_key": value})
