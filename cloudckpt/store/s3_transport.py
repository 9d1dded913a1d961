"""The obstore transport of S3 blob bytes: whole-object GET, PUT and HEAD of blobs, and the
ETag-carrying read that a compare-and-swap starts from.

Blob bytes are most of what a checkpoint moves, and the Python HTTP stack under s3fs
(aiobotocore, aiohttp) costs CPU that training machines and the local S3 servers of a
test box would rather spend elsewhere. obstore (Rust's ``object_store``) moves the same
bytes outside the GIL, at a fraction of the CPU (measured in ``docs/design-notes.md``).

Payloads are sent unsigned (``UNSIGNED-PAYLOAD``): a blob's name is the hash of its raw
bytes and every load checks it, so a SHA-256 of every body on both ends buys nothing. The
commit protocol's conditional writes (``If-None-Match: *``, ``If-Match``) go this way
too, so neither a restore nor a commit starts botocore (its client costs 0.3 s of CPU);
listings, deletes and multipart uploads stay on s3fs. A storage option this module cannot
map keeps the whole store on s3fs.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import urllib.parse
from typing import Any

log = logging.getLogger("cloudckpt.store")

#: storage_options keys (and nested keys) that mean the same thing to obstore.
_TOP = {
    "key",
    "secret",
    "token",
    "endpoint_url",
    "anon",
    "profile",
    "client_kwargs",
    "config_kwargs",
    "skip_instance_cache",
    "use_listings_cache",
}
_CLIENT = {"endpoint_url", "region_name"}
_CONFIG = {"connect_timeout", "read_timeout", "retries", "s3"}

_STATUS = re.compile(r"status code: (\d{3})")
_CODE = re.compile(r"<Code>([^<]+)</Code>")

#: obstore runs its requests on a runtime of threads, started at first use; a child
#: forked after that inherits the runtime without its threads, and any call would hang.
_started = False
_inherited = False


def _after_fork_in_child() -> None:
    global _inherited
    _inherited = _inherited or _started


os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """False in a process forked after obstore ran in its parent (s3fs serves it)."""
    return not _inherited


class S3ResponseError(OSError):
    """An S3 error answer seen through obstore, shaped like botocore's for the retry policy."""

    def __init__(self, message: str, code: str | None, status: int) -> None:
        super().__init__(message)
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


class S3NotFound(S3ResponseError, FileNotFoundError):
    """A 404 answer obstore does not report as not found (a conditional PUT to a missing
    key or bucket, as AWS and moto answer it): the store's "does not exist" either way."""


class ObstoreTransport:
    """GET, PUT, HEAD and the ETag-carrying GET for one bucket prefix, through obstore."""

    def __init__(self, store: Any, prefix: str, endpoint: str | None = None) -> None:
        import obstore

        self._obs = obstore
        self._store = store
        self._prefix = prefix
        #: The endpoint requests go to (None: AWS S3 itself).
        self.endpoint = endpoint

    @classmethod
    def for_s3(
        cls, root: str, opts: dict[str, Any], connect_timeout: float, read_timeout: float
    ) -> ObstoreTransport | None:
        """The transport for ``root`` (``bucket/prefix``) and s3fs ``opts``, or None if
        obstore is missing or an option has no obstore equivalent."""
        unknown = _unmapped(opts)
        if unknown:
            log.debug("s3fs carries blob bytes: no obstore equivalent for %s", unknown)
            return None
        try:
            from obstore.store import S3Store
        except ImportError:
            return None
        bucket, _, prefix = root.partition("/")
        client = opts.get("client_kwargs") or {}
        endpoint = opts.get("endpoint_url") or client.get("endpoint_url")
        region = client.get("region_name")
        if not (endpoint and region):  # what s3fs's botocore would find: profile, env...
            found_endpoint, found_region = _botocore_settings(opts.get("profile"))
            endpoint, region = endpoint or found_endpoint, region or found_region
        if endpoint and not _plain_endpoint(endpoint):
            log.debug("s3fs carries blob bytes: obstore takes no userinfo or path in endpoints")
            return None
        style = ((opts.get("config_kwargs") or {}).get("s3") or {}).get("addressing_style")
        virtual = style == "virtual" or (not endpoint and style != "path")
        config: dict[str, Any] = {
            "region": region or _region(),
            "unsigned_payload": True,
            "virtual_hosted_style_request": virtual,
        }
        if endpoint:
            config["endpoint"] = endpoint
        provider = None
        if opts.get("anon"):
            config["skip_signature"] = True
        elif opts.get("key") and opts.get("secret"):
            config["access_key_id"] = opts["key"]
            config["secret_access_key"] = opts["secret"]
            if opts.get("token"):
                config["session_token"] = opts["token"]
        else:
            provider = _boto3_credentials(opts.get("profile"))
            if provider is None:
                return None
        client_options = {
            "allow_http": bool(endpoint and endpoint.startswith("http://")),
            "connect_timeout": datetime.timedelta(seconds=connect_timeout),
            "read_timeout": datetime.timedelta(seconds=read_timeout),
            # A stalled transfer is caught by read_timeout; a whole large blob on a slow
            # link may take long.
            "timeout": datetime.timedelta(hours=1),
        }
        retry = {"max_retries": 0, "retry_timeout": datetime.timedelta(seconds=read_timeout)}
        try:
            store = S3Store(
                bucket,
                config=config,
                client_options=client_options,
                retry_config=retry,
                credential_provider=provider,
            )
        except BaseException as e:  # obstore may panic on a configuration it rejects
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            log.debug("s3fs carries blob bytes: obstore refused the configuration (%s)", e)
            return None
        return cls(store, prefix, endpoint)

    def _call(self, operation: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        """``operation(store, path, ...)`` with obstore's errors translated."""
        global _started
        _started = True  # obstore's runtime is (about to be) up in this process
        path = f"{self._prefix}/{key}" if self._prefix else key
        try:
            return operation(self._store, path, *args, **kwargs)
        except Exception as e:
            raise _translated(e) from None

    def _read(self, store: Any, path: str) -> tuple[Any, str]:
        # The body streams in .bytes(): it must run inside _call, where a cut-short
        # answer is translated into a retryable error.
        found = self._obs.get(store, path)
        return found.bytes(), found.meta["e_tag"]

    def get(self, key: str, most: int | None = None) -> memoryview:
        """The whole object, or its first ``most`` bytes (one ranged GET: nothing past
        them is transferred), without a copy (a read-only buffer)."""
        if most is None:
            return memoryview(self._call(self._read, key)[0])
        try:
            return memoryview(self._call(self._read_start, key, most))
        except S3ResponseError as e:
            code, status = e.response["Error"]["Code"], e.response["ResponseMetadata"]
            if code == "InvalidRange" or status["HTTPStatusCode"] == 416:
                return memoryview(b"")  # no byte 0: the object is empty
            raise

    def _read_start(self, store: Any, path: str, most: int) -> Any:
        return self._obs.get(store, path, options={"range": (0, most)}).bytes()

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """The object and its ETag (as S3 sends it, quotes included), or None if absent."""
        try:
            body, etag = self._call(self._read, key)
        except FileNotFoundError:
            return None
        return bytes(body), etag

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self._call(self._obs.put, key, data, use_multipart=False)

    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """PUT only if the object is absent (``etag`` None: ``If-None-Match: *``) or has
        ``etag`` (``If-Match``); its new ETag. A lost race raises S3ResponseError 412
        (or 409, as S3 answers two conditional writes at once)."""
        mode = "create" if etag is None else {"e_tag": etag}
        out = self._call(self._obs.put, key, data, mode=mode, use_multipart=False)
        return str(out["e_tag"])

    def head(self, key: str) -> tuple[int, float] | None:
        """(size, modified) or None if absent."""
        try:
            meta = self._call(self._obs.head, key)
        except FileNotFoundError:
            return None
        return int(meta["size"]), meta["last_modified"].timestamp()


def _translated(exc: Exception) -> Exception:
    """obstore's error as one the store's retry policy and messages know."""
    if isinstance(exc, FileNotFoundError) or not type(exc).__module__.startswith("obstore"):
        return exc
    message = str(exc).split("\n\nDebug source:", 1)[0]
    name = type(exc).__name__
    if name in ("PermissionDeniedError", "UnauthenticatedError"):
        return PermissionError(message)
    status = _STATUS.search(message)
    if status:
        code, found = _CODE.search(message), int(status.group(1))
        kind = S3NotFound if found == 404 else S3ResponseError
        return kind(message, code.group(1) if code else None, found)
    if name == "GenericError":  # no answer: refused, reset, timed out, cut short
        return ConnectionError(message)
    return exc


def _unmapped(opts: dict[str, Any]) -> list[str]:
    unknown = [k for k in opts if k not in _TOP]
    unknown += [f"client_kwargs.{k}" for k in opts.get("client_kwargs") or {} if k not in _CLIENT]
    config = opts.get("config_kwargs") or {}
    unknown += [f"config_kwargs.{k}" for k in config if k not in _CONFIG]
    unknown += [f"config_kwargs.s3.{k}" for k in config.get("s3") or {} if k != "addressing_style"]
    return unknown


def _plain_endpoint(endpoint: str) -> bool:
    try:
        url = urllib.parse.urlsplit(endpoint)
        url.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return False
    plain = not (url.username or url.password or url.path.strip("/") or url.query)
    return plain and url.scheme in ("http", "https") and bool(url.hostname)


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _botocore_settings(profile: str | None) -> tuple[str | None, str | None]:
    """The S3 endpoint (None: AWS itself) and region botocore resolves, exactly as the
    s3fs side of the store does: environment, shared config file, profile, services
    section. Credentials are resolved separately (:func:`_boto3_credentials`).

    Read from botocore's configuration alone where that settles it (a configured
    endpoint, or a region of AWS's own partition); building a client to ask it loads
    botocore's endpoint rules and service model, 0.3 s of every ``Repo()``."""
    try:
        import botocore.session

        session = botocore.session.Session(profile=profile)
        region = session.get_config_variable("region")
        configured = _configured_endpoint(session)
        if configured is not None:
            return configured, region or _region()
        if _AWS_REGION.fullmatch(region or _region()):
            return None, region or _region()
        return _client_settings(session, region)
    except Exception as e:  # a broken profile: s3fs reports it on first use
        log.debug("no botocore settings for obstore (%s)", e)
        return None, None


#: Regions whose S3 endpoint is ``*.amazonaws.com`` (the partitions aws and aws-us-gov):
#: obstore derives it from the region. Any other (China, isolated partitions) asks botocore.
_AWS_REGION = re.compile(r"(?!cn-)[a-z]{2}(-gov)?-(?!iso)[a-z]+-\d+")


def _configured_endpoint(session: Any) -> str | None:
    """The endpoint a user configured for S3 (``AWS_ENDPOINT_URL_S3``,
    ``AWS_ENDPOINT_URL``, the config file's ``services`` section or ``endpoint_url``), as
    botocore's client would take it."""
    if session.get_config_variable("ignore_configured_endpoint_urls"):
        return None
    from botocore.configprovider import ConfiguredEndpointProvider

    provider = ConfiguredEndpointProvider(
        full_config=session.full_config, scoped_config=session.get_scoped_config(), client_name="s3"
    )
    found = provider.provide()
    return str(found) if found else None


def _client_settings(session: Any, region: str | None) -> tuple[str | None, str | None]:
    """Endpoint and region as a botocore client resolves them (the slow, general way)."""
    # Placeholder keys: only the endpoint is wanted, not a credential lookup.
    client = session.create_client(
        "s3", region_name=region or _region(), aws_access_key_id="-", aws_secret_access_key="-"
    )
    endpoint = client.meta.endpoint_url
    host = urllib.parse.urlsplit(endpoint).hostname or ""
    return (None if host.endswith(".amazonaws.com") else endpoint), client.meta.region_name


def _boto3_credentials(profile: str | None) -> Any:
    """botocore's whole credential chain (environment, profiles, SSO, instance roles)."""
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider

        session = boto3.Session(profile_name=profile)
        if session.get_credentials() is None:
            return None  # s3fs raises the clear "no credentials" error on first use
        return Boto3CredentialProvider(session)
    except Exception as e:  # an old Python or a broken profile: s3fs reports it
        log.debug("s3fs carries blob bytes: no boto3 credentials for obstore (%s)", e)
        return None
