"""The HF Trainer through cloudckpt: a run killed mid-training resumes in a new process
with an empty working directory (a new machine) from the bucket, exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from safetensors.torch import load_file

from cloudckpt import Repo

CHILD = str(Path(__file__).with_name("child_hf.py"))


def run(server: Any, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True)
    return subprocess.run(
        [sys.executable, CHILD, *args], cwd=cwd, env={**os.environ, **server.env()},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_killed_trainer_resumes_on_a_new_machine(seaweedfs: Any, tmp_path: Path) -> None:
    reference = run(seaweedfs, tmp_path / "a", seaweedfs.fresh_uri("hf"), str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    uri = seaweedfs.fresh_uri("hf")
    killed = run(seaweedfs, tmp_path / "b", uri, str(tmp_path / "x"), "--kill-at", "13")
    assert killed.returncode == -9
    repo = Repo(uri, seaweedfs.storage_options())
    assert [v.step for v in repo.versions()] == [5, 10]

    resumed = run(seaweedfs, tmp_path / "c", uri, str(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-10" in resumed.stdout
    want, got = load_file(tmp_path / "ref"), load_file(tmp_path / "resumed")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [v.step for v in repo.versions()] == [5, 10, 15, 20, 24]
    assert repo.manifest(repo.resolve("main")).state is not None
