"""Damaged repositories: each kind of damage is detected, named, and recovered from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from assertions import assert_state_equal
from torch import nn

from cloudckpt import CheckpointManager, Repo, RepoOptions, TransferOptions, codec
from cloudckpt.blobs import BlobReader, blob_key, iter_chunks
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.store import Store


def model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 4))


OPTIONS = RepoOptions(transfer=TransferOptions(pack_below=1024))


def manager(root: tuple[str, dict[str, Any]], **kwargs: Any) -> CheckpointManager:
    return CheckpointManager(*root, options=OPTIONS, **kwargs)


def two_versions(root: tuple[str, dict[str, Any]]) -> tuple[Repo, dict[str, Any], dict[str, Any]]:
    """Versions 1 and 2 of a model; the big weight differs, so each has blobs of its own."""
    mgr = manager(root, save_every_steps=1)
    repo = mgr.repo
    net = model(0)
    mgr.restore(model=net)
    states = {}
    for step in (1, 2):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        mgr.step(step)
        states[step] = {k: v.clone() for k, v in net.state_dict().items()}
    mgr.close()
    return repo, states[1], states[2]


def own_blob(repo: Repo) -> str:
    """A blob the head uses and its parent does not."""
    head = repo.resolve("main")
    parent = {c.digest for e in repo.manifest(head.parent).tensors for c in iter_chunks(e)}
    mine = [c.digest for e in repo.manifest(head).tensors for c in iter_chunks(e)]
    return blob_key(next(d for d in mine if d not in parent))


def flip_a_byte(store: Store, key: str) -> None:
    data = bytearray(store.get(key))
    data[len(data) // 2] ^= 0x40
    store.put(key, bytes(data))


def truncate(store: Store, key: str) -> None:
    store.put(key, store.get(key)[:-100])


def delete(store: Store, key: str) -> None:
    store.delete([key])


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, delete], ids=lambda f: f.__name__)
def test_a_damaged_blob_is_named_and_restore_falls_back(
    root: tuple[str, dict[str, Any]], damage: Callable[[Store, str], None]
) -> None:
    repo, good, _ = two_versions(root)
    head = repo.resolve("main")
    key = own_blob(repo)
    damage(repo.store, key)

    with pytest.raises(CorruptCheckpoint, match=key):
        repo.load()
    report = repo.verify()
    assert list(report.problems) == [key]

    net = model(9)
    resumed = manager(root).restore(model=net)
    assert resumed.step == 1 and resumed.version is not None
    assert list(resumed.skipped) == [head.id] and key in resumed.skipped[head.id]
    for name, tensor in good.items():
        assert torch.equal(net.state_dict()[name], tensor), name


def test_a_garbled_manifest_is_named_and_restore_falls_back(
    root: tuple[str, dict[str, Any]],
) -> None:
    repo, good, _ = two_versions(root)
    head = repo.resolve("main")
    key = f"manifests/{head.id}.json"
    repo.store.put(key, repo.store.get(key)[:200])

    with pytest.raises(CorruptCheckpoint, match=f"{key} was altered after its commit"):
        repo.load()
    assert key in repo.verify().problems

    net = model(9)
    resumed = manager(root).restore(model=net)
    assert resumed.step == 1 and key in resumed.skipped[head.id]
    assert torch.equal(net.state_dict()["0.weight"], good["0.weight"])


def test_a_garbled_versions_json_is_named_and_repair_recovers_it(
    root: tuple[str, dict[str, Any]],
) -> None:
    repo, _, latest = two_versions(root)
    before = repo.index()
    repo.store.put("versions.json", b'{"format": 1, "branches": {"main": ')

    with pytest.raises(CorruptCheckpoint, match=r"versions\.json is not a valid versions manifest"):
        manager(root).restore(model=model(9))
    with pytest.raises(CorruptCheckpoint, match="repair"):
        repo.load()

    rebuilt = repo.repair()
    assert rebuilt.branches == before.branches
    assert set(rebuilt.versions) == set(before.versions)
    net = model(9)
    assert manager(root).restore(model=net).step == 2
    assert torch.equal(net.state_dict()["0.weight"], latest["0.weight"])


def test_when_no_version_verifies_restore_says_so(root: tuple[str, dict[str, Any]]) -> None:
    repo, _, _ = two_versions(root)
    repo.store.delete(repo.store.list_keys("blobs"))
    with pytest.raises(CorruptCheckpoint, match="branch 'main': no version verifies"):
        manager(root).restore(model=model(9))


# -- a repository of uncompressed blobs on this machine's disk (a local tier's kind) -------
def uncompressed(tmp_path: Any) -> tuple[Repo, str, int]:
    """A version of a local repository of raw blobs; its largest blob's key and raw size."""
    repo = Repo(
        f"file://{tmp_path}/raw", options=RepoOptions(transfer=TransferOptions(compress=False))
    )
    version = repo.commit({"w": torch.randn(64, 1024), "b": torch.randn(16)})
    digest, size = max(
        ((c.digest, c.blob_size) for e in repo.manifest(version).tensors for c in iter_chunks(e)),
        key=lambda blob: blob[1],
    )
    return repo, digest, size


def another_blob_of_the_same_length(store: Store, key: str) -> None:
    data = bytearray(store.get(key))
    data[codec.RAW_HEADER :] = bytes(len(data) - codec.RAW_HEADER)  # a valid header, zeros
    store.put(key, bytes(data))


@pytest.mark.parametrize(
    "damage",
    [flip_a_byte, truncate, another_blob_of_the_same_length, delete],
    ids=lambda f: f.__name__,
)
def test_a_damaged_uncompressed_local_blob_is_named_by_each_read(
    tmp_path: Any, damage: Callable[[Store, str], None]
) -> None:
    """A read in place (one open: size, header, payload) still checks every byte."""
    repo, digest, size = uncompressed(tmp_path)
    key = blob_key(digest)
    damage(repo.store, key)
    with pytest.raises(CorruptCheckpoint, match=key):
        repo.load()
    with pytest.raises(CorruptCheckpoint, match=key):
        BlobReader(repo.store, repo.options.transfer).raw(digest, size)
    assert list(repo.verify().problems) == [key]


def test_an_uncompressed_local_blob_stored_in_another_encoding_still_loads(tmp_path) -> None:
    """Any encoding of a blob's bytes will do: one that is not raw is read whole, decoded."""
    repo, digest, _ = uncompressed(tmp_path)
    want = repo.load()
    key = blob_key(digest)
    raw = np.frombuffer(repo.store.get(key)[codec.RAW_HEADER :], dtype=np.uint8)
    repo.store.put(key, codec.Codec(1).encode(memoryview(raw), codec.CodecChoice(codec.ZSTD, 1)))
    assert_state_equal(want, repo.load())
