"""Misconfiguration is caught before training starts: a URI without a scheme, a bucket
that does not exist (moto does not create buckets on PUT, SeaweedFS does)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest
import torch
from torch import nn

from cloudckpt import CheckpointManager, Repo, StoreError


@pytest.mark.parametrize("uri", ["ckpt/runs/gpt", "runs", "./x"])
def test_a_uri_without_a_scheme_is_refused_saying_what_was_meant(uri: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no scheme.*lost with the machine.*s3://"):
        Repo(uri)
    assert Repo(str(tmp_path / "abs")).commit({"w": torch.ones(2)})  # clearly local


def test_the_cli_refuses_a_uri_without_a_scheme(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cloudckpt.cli", "ls", "ckpt/runs/gpt"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode != 0 and "s3://ckpt/runs/gpt" in out.stderr, out.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture(params=["moto", "seaweedfs"])
def missing(request: pytest.FixtureRequest) -> tuple[Any, str]:
    server = request.getfixturevalue("moto_server" if request.param == "moto" else "seaweedfs")
    return server, f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/runs/gpt"


def test_a_missing_bucket_is_a_store_error_naming_it(missing: tuple[Any, str]) -> None:
    server, uri = missing
    bucket = uri.split("/")[2]
    opts = server.storage_options()
    pattern = rf"bucket '{bucket}' does not exist \(endpoint http://127\.0\.0\.1:\d+\)"
    with pytest.raises(StoreError, match=pattern):
        Repo(uri, opts).commit({"w": torch.ones(2)})
    for exclusive in (True, False):
        with pytest.raises(StoreError, match=pattern):
            CheckpointManager(uri, opts, exclusive=exclusive).restore(model=nn.Linear(2, 2))
    env = {**os.environ, **server.env()}
    out = subprocess.run(
        [sys.executable, "-m", "cloudckpt.cli", "ls", uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 6 and bucket in out.stderr, (out.returncode, out.stderr)


def test_a_refused_connection_says_nothing_listens_there_in_one_line(tmp_path) -> None:
    """Issue 16 item 5: the CLI printed seven retry lines and a misleading hint."""
    from cloudckpt.testing.local_s3 import free_port

    port = free_port()  # nothing listens there
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    out = subprocess.run(
        [sys.executable, "-m", "cloudckpt.cli", "ls", "s3://bucket/run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 6, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and "nothing is listening" in out.stderr
    assert out.stderr.count("retrying") <= 1, out.stderr
