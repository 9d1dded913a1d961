"""Lightning through cloudckpt: a run killed mid-epoch resumes on a "new machine" (a new
process, nothing local) from the bucket with ckpt_path="last", exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")

import torch
from safetensors.torch import load_file

from cloudckpt import Repo
from cloudckpt.integrations import pointer

CHILD = str(Path(__file__).with_name("child_lightning.py"))


def run(server: Any, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, CHILD, *args],
        cwd=cwd,
        env={**os.environ, **server.env()},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference(seaweedfs: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The weights of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    out = run(seaweedfs, tmp, seaweedfs.fresh_uri("pl"), "4", str(tmp / "w.safetensors"))
    assert out.returncode == 0, out.stderr[-3000:]
    return load_file(tmp / "w.safetensors")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_run_resumes_from_last_on_a_new_machine(
    seaweedfs: Any, tmp_path: Path, mode: str, reference: dict[str, Any]
) -> None:
    extra = ["--async"] if mode == "async" else []
    root = seaweedfs.fresh_uri("pl")
    killed = run(
        seaweedfs, tmp_path / "b", root, "4", str(tmp_path / "x"), "--kill-in-epoch", "2", *extra
    )
    assert killed.returncode == -9
    last = f"{root}/checkpoints/last.ckpt"
    clients = pointer.ClientCache(seaweedfs.storage_options(), None)
    assert clients.pointer(last) is not None

    resumed = run(
        seaweedfs,
        tmp_path / "c",
        root,
        "4",
        str(tmp_path / "resumed.safetensors"),
        "--resume",
        *extra,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last}" in resumed.stdout
    got = load_file(tmp_path / "resumed.safetensors")
    assert reference.keys() == got.keys()
    assert all(torch.equal(reference[k], got[k]) for k in reference)
    repo = Repo(f"{root}/checkpoints/.cloudckpt", seaweedfs.storage_options())
    assert repo.resolve("main").step == 20  # 4 epochs of 5 batches
    assert repo.verify().ok


def test_a_pointer_naming_another_repository_is_never_followed(tmp_path: Path) -> None:
    from cloudckpt.errors import CorruptCheckpoint
    from cloudckpt.integrations.lightning import CloudCheckpointIO

    victim = Repo(f"file://{tmp_path}/victim")
    kept = victim.commit({"w": torch.ones(3)})
    older = victim.commit({"w": torch.zeros(3)})
    victim.commit({"w": torch.full((3,), 2.0)})
    io = CloudCheckpointIO()
    ckpt = f"file://{tmp_path}/run/last.ckpt"
    io.save_checkpoint({"w": torch.ones(2), "global_step": 1}, ckpt)
    directory, name = pointer.split(ckpt)
    planted = pointer.Pointer(victim.uri, older.id).dumps()
    Repo(directory).store.put(name, planted)

    with pytest.raises(CorruptCheckpoint, match=r"points into .*victim"):
        io.load_checkpoint(ckpt)
    io.save_checkpoint({"w": torch.ones(2), "global_step": 2}, ckpt)  # overwrites it
    Repo(directory).store.put(name, planted)
    io.remove_checkpoint(ckpt)
    assert {kept.id, older.id} <= set(victim.index().versions)
    assert len(victim.versions()) == 3


def test_a_pointer_naming_a_path_like_version_is_refused(tmp_path: Path) -> None:
    import json

    from cloudckpt.errors import CorruptCheckpoint
    from cloudckpt.integrations.lightning import CloudCheckpointIO

    io = CloudCheckpointIO()
    ckpt = f"file://{tmp_path}/run/last.ckpt"
    io.save_checkpoint({"w": torch.ones(2), "global_step": 1}, ckpt)
    directory, name = pointer.split(ckpt)
    doc = json.loads(Repo(directory).store.get(name))
    doc["version"] = "../../../../etc/passwd"
    Repo(directory).store.put(name, json.dumps(doc).encode())
    with pytest.raises(CorruptCheckpoint, match="not a cloudckpt checkpoint pointer"):
        io.load_checkpoint(ckpt)


def test_a_copied_pointer_keeps_the_version_it_still_names(tmp_path: Path) -> None:
    """``cp best.ckpt last.ckpt``, then Lightning overwrites last.ckpt: the version
    best.ckpt names must stay."""
    from cloudckpt.integrations.lightning import CloudCheckpointIO

    io = CloudCheckpointIO()
    best, last = f"file://{tmp_path}/run/best.ckpt", f"file://{tmp_path}/run/last.ckpt"
    io.save_checkpoint({"w": torch.ones(2), "global_step": 1}, best)
    directory, _ = pointer.split(best)
    store = Repo(directory).store
    store.put("last.ckpt", store.get("best.ckpt"))
    io.save_checkpoint({"w": torch.zeros(2), "global_step": 2}, last)
    assert torch.equal(io.load_checkpoint(best)["w"], torch.ones(2))
