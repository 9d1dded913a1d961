"""Repo in real processes: a commit killed with SIGKILL, and the memory a commit needs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import reaped, sigkill_when

from cloudckpt import Repo, TransferOptions

CHILD = str(Path(__file__).with_name("child_commit.py"))
MiB = 1 << 20


def start_child(server, uri: str, megabytes: int, chunk: int) -> subprocess.Popen[str]:
    env = {**os.environ, **server.env()}
    return subprocess.Popen(
        [sys.executable, CHILD, uri, str(megabytes), str(chunk)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_line(proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    line = ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    assert line, f"child gave no output (exit code {proc.poll()})"
    return json.loads(line)


def test_sigkill_mid_upload_leaves_previous_version(seaweedfs) -> None:
    uri = seaweedfs.fresh_uri("killed")
    repo = Repo(uri, seaweedfs.storage_options())
    previous = {"model": {"w": torch.arange(10.0)}, "step": 1}
    v1 = repo.commit(previous, step=1)
    blobs_before = len(repo.store.list_keys("blobs"))

    proc = start_child(seaweedfs, uri, megabytes=256, chunk=MiB)
    with reaped(proc):
        assert read_line(proc)["ready"]
        sigkill_when(proc, lambda: len(repo.store.list_keys("blobs")) >= blobs_before + 10)
    assert proc.returncode == -signal.SIGKILL

    uploaded = len(repo.store.list_keys("blobs")) - blobs_before
    assert 10 <= uploaded < 256, "the kill did not land mid-upload"
    fresh = Repo(uri, seaweedfs.storage_options())
    assert [v.id for v in fresh.versions()] == [v1.id]
    loaded = fresh.load("main")
    assert torch.equal(loaded["model"]["w"], previous["model"]["w"]) and loaded["step"] == 1


@pytest.mark.timeout(300)
def test_commit_of_1gb_state_needs_less_than_512mib_extra(seaweedfs) -> None:
    uri = seaweedfs.fresh_uri("big")
    proc = start_child(seaweedfs, uri, megabytes=1024, chunk=TransferOptions().chunk_size)
    with reaped(proc):
        ready = read_line(proc)
        done = read_line(proc, timeout=240)
        assert proc.wait(timeout=30) == 0
    extra = done["rss"] - ready["rss"]
    print(f"peak RSS: live state + {extra / MiB:.0f} MiB for a 1 GiB state")
    assert extra < 512 * MiB
    version = Repo(uri, seaweedfs.storage_options()).resolve("main")
    assert version.id == done["committed"] and version.logical_bytes == 1024 * MiB
