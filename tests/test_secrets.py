"""Credentials and signed URLs never appear in logs, exceptions, stored objects or CLI output."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from cloudckpt import CheckpointManager, Repo
from cloudckpt.errors import StoreError
from cloudckpt.redact import redact
from cloudckpt.repo import RepoOptions
from cloudckpt.store import Store, StoreOptions
from cloudckpt.store.retry import RetryPolicy
from cloudckpt.testing.faults import FaultPlan, FaultProxy
from cloudckpt.testing.local_s3 import free_port

KEY = "AKIACLOUDCKPTLEAK001"
SECRET = "cloudckpt+TEST/secret/DoNotLog0123456789"
CREDENTIALS = {"key": KEY, "secret": SECRET}
QUICK = StoreOptions(
    connect_timeout=1, read_timeout=1, retry=RetryPolicy(attempts=2, initial_backoff=0.01)
)
PATIENT = StoreOptions(retry=RetryPolicy(attempts=12, initial_backoff=0.01, max_backoff=0.1))


def assert_clean(text: str) -> None:
    """Neither credential, nor any 10-character piece of the secret, is in ``text``."""
    assert KEY not in text, text
    pieces = {SECRET[i : i + 10] for i in range(len(SECRET) - 9)}
    assert not any(p in text for p in pieces), text


def test_logs_errors_and_stored_objects_hold_no_credentials(
    seaweedfs: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="cloudckpt")
    uri = seaweedfs.fresh_uri("secrets")
    plan = FaultPlan(rate=0.3, seed=5, kinds=("slowdown", "internal", "reset"))
    with FaultProxy(seaweedfs.endpoint, plan) as proxy:  # retries log their failures
        opts = proxy.storage_options(CREDENTIALS)
        with CheckpointManager(
            uri, opts, save_every_steps=1, options=RepoOptions(store=PATIENT)
        ) as mgr:
            mgr.restore(model=nn.Linear(64, 64))
            for step in range(1, 4):
                mgr.step(step, metrics={"loss": 1.0 / step})
    assert proxy.faults() > 0
    # A refused endpoint with the credentials in its URL, as some users write it.
    refused = f"http://{KEY}:{SECRET}@127.0.0.1:{free_port()}"
    with pytest.raises(StoreError) as err:
        Store(uri, {**CREDENTIALS, "endpoint_url": refused}, QUICK).get("versions.json")
    assert "***" in str(err.value)
    assert_clean(str(err.value))
    ours = [r for r in caplog.records if r.name.startswith("cloudckpt")]
    assert any("retrying" in r.getMessage() for r in ours)
    assert_clean("\n".join(r.getMessage() for r in ours))
    store = Store(uri, seaweedfs.storage_options())
    keys = store.list_keys()
    assert any(k.startswith("manifests/") for k in keys) and "versions.json" in keys
    for key in keys:
        data = store.get(key)
        assert KEY.encode() not in data and SECRET.encode() not in data, key


def test_cli_output_holds_no_credentials(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("secrets")
    Repo(uri, {**seaweedfs.storage_options(), **CREDENTIALS}).commit({"w": torch.ones(4)})
    env = {
        **os.environ,
        **seaweedfs.env(),
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
    }
    refused = f"http://{KEY}:{SECRET}@127.0.0.1:{free_port()}"
    script = (
        "import sys; from cloudckpt.cli import main; "
        f"sys.exit(main(['log', {uri!r}]) * 100 + main(['verify', {uri!r}, '--endpoint-url', "
        f"{refused!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 6, out.stderr  # log: 0, verify: the store error's exit code
    assert "main" in out.stdout and "***" in out.stderr
    assert_clean(out.stdout + out.stderr)


def test_redact_scrubs_signed_urls_userinfo_and_auth_headers() -> None:
    presigned = (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
        f"{KEY}%2F20261127%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=abcdef0123456789"
        "&X-Amz-Security-Token=FwoGZXIvYXdzEJr"
    )
    text = redact(f"GET {presigned} failed; Authorization: AWS4-HMAC-SHA256 Credential={KEY}")
    assert "abcdef0123456789" not in text and "FwoGZXIvYXdzEJr" not in text
    assert KEY not in text and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in text
    assert redact("s3://user:pa55word@host/x") == "s3://***@host/x"
