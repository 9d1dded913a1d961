"""Repo: commit and load round trips, dedup, partial and in-place loads, conflicts."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytest
import torch
from assertions import assert_state_equal
from conftest import S3Requests

import cloudckpt
from cloudckpt import CheckpointNotFound, CommitConflict, Repo, RepoOptions, TransferOptions
from cloudckpt.errors import UnsupportedState
from cloudckpt.testing.gpt import GPT, GPTConfig, train_state


def small_chunks(chunk_size: int = 4096) -> RepoOptions:
    return RepoOptions(transfer=TransferOptions(chunk_size=chunk_size))


def every_kind_of_leaf() -> dict:
    torch.manual_seed(1)
    base = torch.randn(6, 5)
    return {
        "fp32": torch.randn(300, 7),
        "bf16": torch.randn(513, 3).to(torch.bfloat16),
        "fp16": torch.randn(1000).to(torch.float16),
        "fp64": torch.randn(17, dtype=torch.float64),
        "int64": torch.randint(-(2**62), 2**62, (257,)),
        "int8": torch.randint(-128, 127, (1001,), dtype=torch.int8),
        "uint8": torch.randint(0, 255, (3, 3), dtype=torch.uint8),
        "bool": torch.rand(999) > 0.3,
        "complex": torch.randn(10, dtype=torch.complex64),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.25),
        "scalar_int": torch.tensor(7),
        "transposed": base.t(),
        "strided": base[::2, 1:4],
        "expanded": torch.arange(4.0).expand(3, 4),
        "param": torch.nn.Parameter(torch.randn(4, 4)),
        "numpy": np.arange(12, dtype=np.float32).reshape(3, 4),
        "numpy_be": np.arange(5, dtype=">i4"),
        "np_scalar": np.float64(2.5),
        "np_int": np.int32(-3),
        "python": [1, 2.5, float("inf"), float("nan"), -0.0, True, None, "text", b"\x00\xff"],
        "tuple": (1, ("nested", 2)),
        "int_keys": {0: "a", 1: "b", (2, 3): "tuple key"},
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def test_every_kind_of_leaf_round_trips_bit_exact(backend) -> None:
    uri, opts = backend
    repo = Repo(uri, opts, options=small_chunks(256))
    state = every_kind_of_leaf()
    version = repo.commit(state, step=3, metrics={"loss": 0.5}, message="all leaves")
    assert version.step == 3 and version.metrics == {"loss": 0.5} and version.branch == "main"
    loaded = Repo(uri, opts).load("main")
    assert_state_equal(state, loaded)
    assert not loaded["param"].requires_grad


def test_gpt_with_adamw_round_trips_and_tied_weights_are_stored_once(backend) -> None:
    uri, opts = backend
    state = train_state(GPTConfig(n_layer=2, n_embd=32), steps=3)
    repo = Repo(uri, opts, options=small_chunks(16 * 1024))
    repo.commit(state, step=state["step"])
    loaded = repo.load()
    assert_state_equal(state, loaded)
    tensors = repo.manifest().tensors
    paths = [t["path"] for t in tensors]
    assert "model.wte.weight" in paths and "model.lm_head.weight" not in paths
    assert loaded["model"]["wte.weight"] is loaded["model"]["lm_head.weight"]


def test_refs_branch_version_id_and_latest() -> None:
    repo = Repo("memory://refs-test")
    v1 = repo.commit({"x": torch.ones(3)}, step=1)
    v2 = repo.commit({"x": torch.zeros(3)}, step=2, branch="exp")
    assert v2.parent is None and repo.branches() == {"main": v1.id, "exp": v2.id}
    assert torch.equal(repo.load("main")["x"], torch.ones(3))
    assert torch.equal(repo.load(v1.id)["x"], torch.ones(3))
    assert torch.equal(repo.load("latest")["x"], torch.zeros(3))
    v3 = repo.commit({"x": torch.full((3,), 2.0)}, step=3)
    assert v3.parent == v1.id
    assert [v.id for v in repo.versions()] == [v1.id, v2.id, v3.id]
    with pytest.raises(CheckpointNotFound, match="no branch, tag or version named 'nope'"):
        repo.load("nope")


def test_empty_repository_says_it_has_no_versions() -> None:
    with pytest.raises(CheckpointNotFound, match="none yet"):
        Repo("memory://empty-repo").load()


def test_second_commit_of_same_state_uploads_no_blob(s3_backend) -> None:
    uri, opts = s3_backend
    state = train_state(GPTConfig(n_layer=1, n_embd=32), steps=1)
    repo = Repo(uri, opts, options=small_chunks(8 * 1024))
    requests = S3Requests(repo.store)
    repo.commit(state, step=1)
    first_blob_puts = requests.count("PUT", "blobs/")
    assert first_blob_puts > 10
    assert first_blob_puts == len(repo.store.list_keys("blobs"))
    requests.calls.clear()
    v2 = repo.commit(state, step=2)
    assert requests.count("PUT", "blobs/") == 0
    assert requests.count("HEAD", "blobs/") == 0  # known from the parent's manifest
    assert v2.uploaded_bytes == 0 and v2.stored_bytes > 0
    # Only the manifest, versions.json and the published marker were written.
    assert sorted(set(requests.keys("PUT"))) == sorted(
        {f"manifests/{v2.id}.json", "versions.json", f"published/{v2.id}"}
    )


def test_changed_tensor_uploads_only_its_chunks(s3_backend) -> None:
    uri, opts = s3_backend
    repo = Repo(uri, opts, options=small_chunks(4096))
    state = {"frozen": torch.randn(64, 64), "trained": torch.randn(64, 64)}
    repo.commit(state)
    requests = S3Requests(repo.store)
    state["trained"][0, 0] += 1.0  # touches the first 4 KiB chunk of 16
    v2 = repo.commit(state)
    assert requests.count("PUT", "blobs/") == 1
    assert 0 < v2.uploaded_bytes < 4096
    assert_state_equal(state, repo.load())


def test_partial_load_fetches_only_the_selected_chunks(s3_backend) -> None:
    uri, opts = s3_backend
    state = train_state(GPTConfig(n_layer=1, n_embd=32), steps=1)
    repo = Repo(uri, opts, options=small_chunks(8 * 1024))
    repo.commit(state)
    manifest = repo.manifest()
    model_blobs = {
        c[0] for t in manifest.tensors if t["path"].startswith("model.") for c in t["chunks"]
    }
    reader = Repo(uri, opts)
    requests = S3Requests(reader.store)
    part = reader.load(keys=["model.*"])
    assert list(part) == ["model"]
    assert_state_equal(state["model"], part["model"])
    fetched = {k.rsplit("/", 1)[-1] for k in requests.keys("GET", "blobs/")}
    assert fetched == model_blobs


def test_partial_load_by_exact_name_and_prefix() -> None:
    repo = Repo("memory://partial-names")
    state = {"a": {"x": torch.ones(2), "y": torch.zeros(2)}, "b": [torch.ones(1), 5], "step": 4}
    repo.commit(state)
    assert list(repo.load(keys=["a.x"])["a"]) == ["x"]
    got = repo.load(keys=["b.1", "step"])
    assert got == {"b": [None, 5], "step": 4}
    with pytest.raises(CheckpointNotFound, match="matches keys"):
        repo.load(keys=["nothing.*"])


def test_load_into_model_and_optimizer_reuses_their_tensors() -> None:
    cfg = GPTConfig(n_layer=1, n_embd=32)
    state = train_state(cfg, steps=2)
    repo = Repo("memory://into-test", options=small_chunks(4096))
    repo.commit(state)
    # A fresh model and an optimizer that already has state of the right shapes.
    torch.manual_seed(123)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    param_ptrs = [p.data_ptr() for p in model.parameters()]
    exp_avg = opt.state[model.wte.weight]["exp_avg"]
    exp_avg_ptr = exp_avg.data_ptr()

    loaded = repo.load(into={"model": model, "optimizer": opt})

    assert [p.data_ptr() for p in model.parameters()] == param_ptrs
    assert opt.state[model.wte.weight]["exp_avg"].data_ptr() == exp_avg_ptr
    assert_state_equal(state["model"], model.state_dict())
    assert_state_equal(state["optimizer"]["state"], opt.state_dict()["state"])
    assert loaded["step"] == 2


def test_a_local_uncompressed_load_opens_each_blob_once(tmp_path, monkeypatch) -> None:
    """In place: one open gives a blob's size, header and payload, and nothing is read
    whole (the local tier's restore)."""
    options = RepoOptions(transfer=TransferOptions(chunk_size=4096, compress=False))
    repo = Repo(f"file://{tmp_path}/raw", options=options)
    state = train_state(GPTConfig(n_layer=1, n_embd=32), steps=1)
    repo.commit(state)
    blobs = len(repo.store.list_keys("blobs/"))
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if "/blobs/" in str(path):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_open)
    loaded = Repo(repo.uri, options=options)
    get_buffer = loaded.store.get_buffer

    def documents_only(key: str, limit: int | None = None) -> Any:
        assert not key.startswith("blobs/"), f"{key} read whole"
        return get_buffer(key, limit)

    monkeypatch.setattr(loaded.store, "get_buffer", documents_only)
    assert_state_equal(state, loaded.load())
    assert len(opened) == len(set(opened)) == blobs > 10


def test_load_into_whole_module() -> None:
    model = torch.nn.Linear(3, 2)
    repo = Repo("memory://into-module")
    repo.commit(model.state_dict())
    other = torch.nn.Linear(3, 2)
    repo.load(into=other)
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)


@pytest.mark.parametrize(
    ("bad", "path"),
    [
        ({"model": {"fn": print}}, "model.fn"),
        ({"opt": [1, object()]}, "opt.1"),
        ({"arr": np.array([object()], dtype=object)}, "arr"),
        ({"set": {1, 2}}, "set"),
        ({"sparse": torch.eye(3).to_sparse()}, "sparse"),
    ],
)
def test_unsupported_state_is_refused_before_upload_naming_its_path(bad, path) -> None:
    repo = Repo("memory://unsupported")
    with pytest.raises(UnsupportedState, match=path.replace(".", r"\.")):
        repo.commit(bad)
    assert repo.store.list_keys() == []


def test_commit_conflict_when_branch_moves_during_upload() -> None:
    repo = Repo("memory://conflict")
    repo.commit({"x": torch.ones(1)})
    other = Repo("memory://conflict")
    original = repo.store.put_if_absent

    def racing_put_if_absent(key: str, data: bytes) -> bool:
        # Another writer commits to the same branch while this manifest is written.
        if key.startswith("manifests/") and not racing_put_if_absent.done:
            racing_put_if_absent.done = True
            other.commit({"x": torch.zeros(1)})
        return original(key, data)

    racing_put_if_absent.done = False
    repo.store.put_if_absent = racing_put_if_absent  # type: ignore[method-assign]
    with pytest.raises(CommitConflict, match="branch 'main' moved"):
        repo.commit({"x": torch.full((1,), 2.0)})
    assert torch.equal(repo.load()["x"], torch.zeros(1))
    assert len(repo.versions()) == 2


def test_public_api_names() -> None:
    for name in ("Repo", "CheckpointNotFound", "CorruptCheckpoint", "CommitConflict"):
        assert hasattr(cloudckpt, name)
    for name in ("StoreError", "UnsupportedState"):
        assert hasattr(cloudckpt.errors, name)


@pytest.mark.parametrize("kind", ["branch", "tag"])
def test_no_ref_is_created_on_a_version_deleted_meanwhile(tmp_path, kind) -> None:
    repo = Repo(f"file://{tmp_path}/repo")
    target = repo.commit({"w": torch.ones(4)})
    repo.commit({"w": torch.zeros(4)})
    read = repo.index

    def index_then_delete() -> Any:  # the delete lands after the ref's target was resolved
        found = read()
        Repo(repo.uri).delete([target.id])
        return found

    repo.index = index_then_delete  # type: ignore[method-assign]
    with pytest.raises(CommitConflict, match="deleted meanwhile"):
        getattr(repo, kind)("exp", target.id)
    repo.index = read  # type: ignore[method-assign]
    assert "exp" not in repo.branches() and "exp" not in repo.tags()
