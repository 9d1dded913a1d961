"""The DCP storage backend in one process (the multi-rank runs are in test_distributed)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from cloudckpt import Repo
from cloudckpt.dcp import CloudStorageReader, CloudStorageWriter
from cloudckpt.errors import CheckpointNotFound
from cloudckpt.lease import WriterLease
from cloudckpt.testing.gpt import GPTConfig, train_state


def test_save_and_load_without_unpickling_anything(
    seaweedfs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, opts = seaweedfs.fresh_uri("dcp"), seaweedfs.storage_options()
    saved = train_state(GPTConfig(), steps=2)
    saved["optimizer"]["param_groups"][0]["note"] = "lr warmed up"
    writer = CloudStorageWriter(uri, opts, step=2, metrics={"loss": 1.5})
    dcp.save(saved, storage_writer=writer)
    assert writer.version is not None and writer.version.step == 2

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the load path unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    target = train_state(GPTConfig(), steps=1, seed=5)
    target["optimizer"]["param_groups"][0]["note"] = ""
    dcp.load(target, storage_reader=CloudStorageReader(uri, opts))
    for name, tensor in saved["model"].items():
        assert torch.equal(target["model"][name], tensor), name
    assert target["optimizer"]["param_groups"][0]["note"] == "lr warmed up"
    assert target["step"] == 2


def test_a_version_committed_by_repo_is_not_read_as_dcp(seaweedfs: Any) -> None:
    uri, opts = seaweedfs.fresh_uri("dcp"), seaweedfs.storage_options()
    Repo(uri, opts).commit({"w": torch.ones(3)})
    with pytest.raises(CheckpointException) as err:
        dcp.load({"w": torch.zeros(3)}, storage_reader=CloudStorageReader(uri, opts))
    assert "not saved with torch.distributed.checkpoint" in str(err.value.failures[0])


def test_a_second_save_of_the_same_shards_uploads_nothing(seaweedfs: Any) -> None:
    uri, opts = seaweedfs.fresh_uri("dcp"), seaweedfs.storage_options()
    state = {"w": torch.randn(256, 256), "b": torch.randn(256)}
    dcp.save(state, storage_writer=CloudStorageWriter(uri, opts, step=1))
    again = CloudStorageWriter(uri, opts, step=2)
    dcp.save(state, storage_writer=again)
    assert again.version is not None and again.version.uploaded_bytes == 0
    assert again.version.parent is not None
    with pytest.raises(CheckpointNotFound):
        CloudStorageReader(uri, opts, ref="no-such-branch").read_metadata()


def test_a_save_with_a_superseded_fence_is_refused(seaweedfs: Any) -> None:
    uri, opts = seaweedfs.fresh_uri("dcp"), seaweedfs.storage_options()
    store = Repo(uri, opts).store
    old = WriterLease(store, "main", ttl=30).acquire()
    dcp.save({"w": torch.ones(8)}, storage_writer=CloudStorageWriter(uri, opts, fence=old.fence))
    new = WriterLease(store, "main", ttl=30).acquire(force=True)
    with pytest.raises(CheckpointException, match="FencedOut"):  # torch wraps it
        dcp.save(
            {"w": torch.zeros(8)}, storage_writer=CloudStorageWriter(uri, opts, fence=old.fence)
        )
    writer = CloudStorageWriter(uri, opts, fence=new.fence)
    dcp.save({"w": torch.zeros(8)}, storage_writer=writer)
    assert writer.version is not None and writer.version.fence == new.fence
    old.release()
    new.release()
