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
        [sys.executable, CHILD, *args],
        cwd=cwd,
        env={**os.environ, **server.env()},
        capture_output=True,
        text=True,
        timeout=300,
    )


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


# -- hostile or damaged repositories -----------------------------------------------------
def tiny_model() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


def stand_in_trainer(output_dir: Path, model: Any) -> Any:
    """What ``resume`` reads of a Trainer: its output_dir and its model."""
    from types import SimpleNamespace

    return SimpleNamespace(args=SimpleNamespace(output_dir=str(output_dir)), model=model)


def saved(callback: Any, model: Any, step: int) -> None:
    from transformers import TrainerControl, TrainerState

    state = TrainerState(global_step=step, is_world_process_zero=True)
    callback.on_save(None, state, TrainerControl(), model=model)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_a_stored_step_that_is_a_path_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    import json

    from cloudckpt.errors import CorruptCheckpoint
    from cloudckpt.integrations.transformers import CloudCheckpointCallback

    callback = CloudCheckpointCallback(f"file://{tmp_path}/repo")
    model = tiny_model()
    saved(callback, model, 5)
    index = json.loads(callback.repo.store.get("versions.json"))
    index["versions"][0]["step"] = "5/../../../escaped"
    callback.repo.store.put("versions.json", json.dumps(index).encode())
    out = tmp_path / "a" / "b" / "c" / "out"
    before = files_under(tmp_path)

    with pytest.raises(CorruptCheckpoint, match=r"versions\.json.*step.*not an integer"):
        callback.resume(stand_in_trainer(out, model))
    assert files_under(tmp_path) == before


def test_resume_passes_over_a_damaged_head_to_its_parent(tmp_path: Path) -> None:
    from cloudckpt.integrations.transformers import CloudCheckpointCallback

    callback = CloudCheckpointCallback(f"file://{tmp_path}/repo")
    model = tiny_model()
    saved(callback, model, 5)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    saved(callback, model, 10)
    head = callback.repo.resolve("main")
    key = f"manifests/{head.id}.json"
    callback.repo.store.put(
        key, callback.repo.store.get(key).replace(b'"shape": [', b'"shape": ["')
    )
    fresh = tiny_model()
    out = tmp_path / "out"

    laid_out = callback.resume(stand_in_trainer(out, fresh))
    assert laid_out == str((out / "checkpoint-5").resolve())
    assert not (out / "checkpoint-10").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert all(torch.equal(fresh.state_dict()[k], first[k]) for k in first)
    assert (out / "checkpoint-5" / "trainer_state.json").is_file()
