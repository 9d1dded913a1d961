"""Azure Blob Storage (``az://``, ``abfs://``) on a real Azurite: conditional writes,
retries, errors that say what to check, no credential in output, abandoned uploads."""

from __future__ import annotations

import base64
import os
import signal
import time
import warnings
from typing import Any

import pytest
import torch
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from processes import exported_env, infra_script, reaped

from cloudckpt import Repo
from cloudckpt.errors import PreconditionFailed, StoreError
from cloudckpt.store import RetryPolicy, Store, StoreOptions
from cloudckpt.store.azure import AzureBackend
from cloudckpt.testing.local_azure import ACCOUNT, ACCOUNT_KEY, Azurite

FAST_RETRY = RetryPolicy(attempts=4, total_seconds=20, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture
def store(azurite: Azurite) -> Store:
    return Store(
        azurite.fresh_uri("azure"), azurite.storage_options(), StoreOptions(retry=FAST_RETRY)
    )


@pytest.mark.parametrize("scheme", ["az", "abfs", "abfss"])
def test_each_azure_scheme_is_served_by_the_azure_backend_with_no_warning(
    azurite: Azurite, scheme: str
) -> None:
    uri = azurite.fresh_uri().replace("az://", f"{scheme}://")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not single-writer
        store = Store(uri, azurite.storage_options())
    assert type(store.backend) is AzureBackend
    store.put("a", b"1")
    assert store.get("a") == b"1"


def test_an_abfs_uri_with_the_account_in_its_host_names_the_account() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    store = Store("abfs://runs@myaccount.dfs.core.windows.net/exp1", {"account_key": key})
    assert store.backend.root == "runs/exp1"
    assert "https://myaccount.blob.core.windows.net" in store.backend.endpoint
    assert key not in repr(store) + store.backend.endpoint


def test_create_if_absent_and_replace_if_unchanged_hold_on_the_server(store: Store) -> None:
    assert store.put_if_absent("lease", b"mine")
    assert not store.put_if_absent("lease", b"theirs")
    assert store.get("lease") == b"mine"

    with pytest.raises(PreconditionFailed):
        store.put_if_match("lease", b"theirs", None)  # create-only, but it exists
    _, etag = store.read_versioned("lease")  # type: ignore[misc]
    newer = store.put_if_match("lease", b"second", etag)
    assert newer != etag
    with pytest.raises(PreconditionFailed):
        store.put_if_match("lease", b"stale", etag)  # another writer got there first
    assert store.read_versioned("lease") == (b"second", newer)
    store.put("lease", b"plain")  # a plain put overwrites
    assert store.get("lease") == b"plain"


def test_large_blobs_go_up_as_staged_blocks_and_read_back_whole(azurite: Azurite) -> None:
    store = Store(
        azurite.fresh_uri("blocks"), azurite.storage_options(), StoreOptions(part_size=1 << 20)
    )
    data = bytes(range(256)) * (5 * 4096 + 7)  # five blocks and a bit
    store.put("blobs/big", data)
    assert store.get("blobs/big") == data
    container, prefix = store.uri.removeprefix("az://").split("/", 1)
    blob = azurite.client().get_blob_client(container, f"{prefix}/blobs/big")
    committed, uncommitted = blob.get_block_list("all")
    assert len(committed) == 6 and uncommitted == []


def _fail_then_pass(
    store: Store, monkeypatch: pytest.MonkeyPatch, errors: list[Exception]
) -> list[int]:
    """Make the next blob requests raise ``errors`` in turn, then behave; count them."""
    calls = [0]
    real = store.backend._blob  # type: ignore[attr-defined]

    def blob(key: str) -> Any:
        client = real(key)
        upload = client.upload_blob

        async def flaky(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if errors:
                raise errors.pop(0)
            return await upload(*args, **kwargs)

        client.upload_blob = flaky
        return client

    monkeypatch.setattr(store.backend, "_blob", blob)
    return calls


def _http_error(status: int, code: str) -> HttpResponseError:
    error = HttpResponseError(message=f"{code}: try later")
    error.status_code, error.error_code = status, code
    return error


@pytest.mark.parametrize(
    ("status", "code"),
    [(503, "ServerBusy"), (500, "InternalError"), (429, "TooManyRequests"), (408, "Timeout")],
)
def test_transient_azure_errors_are_retried(
    store: Store, monkeypatch: pytest.MonkeyPatch, status: int, code: str
) -> None:
    calls = _fail_then_pass(store, monkeypatch, [_http_error(status, code)])
    store.put("obj", b"1")
    assert calls[0] == 2
    assert store.get("obj") == b"1"


def test_a_connection_reset_is_retried(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fail_then_pass(store, monkeypatch, [ServiceRequestError("Connection reset by peer")])
    assert store.put_if_absent("obj", b"1")
    assert calls[0] == 2


def test_a_lost_race_and_a_denial_are_not_retried(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fail_then_pass(store, monkeypatch, [_http_error(412, "ConditionNotMet")])
    with pytest.raises(PreconditionFailed):
        store.put_if_match("obj", b"1", '"0x1"')
    assert calls[0] == 1
    calls = _fail_then_pass(store, monkeypatch, [_http_error(403, "AuthorizationFailure")])
    with pytest.raises(StoreError, match=r"access denied .*check the credentials"):
        store.put("obj", b"1")
    assert calls[0] == 1


def test_a_missing_container_is_named_with_what_to_check(azurite: Azurite) -> None:
    store = Store("az://no-such-container/run", azurite.storage_options())
    for attempt in (
        store.check_root,
        lambda: store.get("versions.json"),
        lambda: store.list_keys(),
        lambda: store.put_if_match("versions.json", b"{}", None),
        lambda: store.put_if_absent("manifests/a.json", b"{}"),
    ):
        with pytest.raises(StoreError) as info:
            attempt()
        message = str(info.value)
        assert "container 'no-such-container' does not exist" in message
        assert "127.0.0.1" in message and "create it" in message and "account" in message


def test_no_account_key_in_any_message(azurite: Azurite) -> None:
    wrong_key = base64.b64encode(b"not the key of this account, 32+").decode()
    conn = azurite.connection_string.replace(ACCOUNT_KEY, wrong_key)
    store = Store(azurite.fresh_uri("denied"), {"connection_string": conn})
    with pytest.raises(StoreError) as info:
        store.put("obj", b"1")
    assert "access denied" in str(info.value) or "403" in str(info.value)
    # Nothing listening: the message names the endpoint, never the key.
    closed = azurite.connection_string.replace(azurite.endpoint, f"http://127.0.0.1:9/{ACCOUNT}")
    fast = StoreOptions(retry=RetryPolicy(attempts=2, total_seconds=5, initial_backoff=0.01))
    with pytest.raises(StoreError) as refused:
        Store(azurite.fresh_uri("closed"), {"connection_string": closed}, fast).get("obj")
    for text in (str(info.value), repr(store), str(refused.value)):
        assert ACCOUNT_KEY not in text and wrong_key not in text
    assert "127.0.0.1:9" in str(refused.value)


def test_gc_discards_the_blocks_of_an_abandoned_upload_and_keeps_committed_blobs(
    store: Store, azurite: Azurite
) -> None:
    backend = store.backend
    assert isinstance(backend, AzureBackend)
    block = base64.b64encode(b"killed-000001").decode()
    backend.stage_block("blobs/abandoned", block, b"half an upload")
    store.put("blobs/kept", b"whole")
    backend.stage_block("blobs/kept", block, b"a second writer's, committed below")
    assert store.list_keys() == ["blobs/kept"]  # staged blocks are invisible
    prefix = store.uri.split("/", 3)[3]
    assert azurite.uncommitted_blobs(store.uri) == [f"{prefix}/blobs/abandoned"]

    assert store.abort_stale_uploads(time.time() - 3600) == 0  # too recent
    assert store.abort_stale_uploads(time.time() + 5) == 1

    assert azurite.uncommitted_blobs(store.uri) == []
    assert store.get("blobs/kept") == b"whole"


def test_the_local_azure_script_serves_until_stopped() -> None:
    proc = infra_script("local-azure.sh")
    with reaped(proc):
        env = exported_env(proc)
        conn = env["AZURE_STORAGE_CONNECTION_STRING"]
        assert "BlobEndpoint=http://127.0.0.1:" in conn
        repo = Repo("az://checkpoints/runs/x", {"connection_string": conn})
        repo.commit({"w": torch.ones(2)})
        assert len(repo.versions()) == 1
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
