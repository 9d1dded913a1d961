"""Hostile or damaged repositories are refused before any large allocation, nothing is
written outside the repository, and no code from the store ever runs."""

from __future__ import annotations

import json
import os
import pickle
import struct
import uuid

import pytest
import torch
import zstandard
from forgery import forge_manifest

from cloudckpt import Repo
from cloudckpt.blobs import blob_key
from cloudckpt.errors import CorruptCheckpoint


def committed(name: str) -> tuple[Repo, dict]:
    repo = Repo(f"memory://hostile/{name}-{uuid.uuid4().hex}")
    version = repo.commit({"w": torch.randn(64, 64), "step": 1})
    return repo, json.loads(repo.store.get(f"manifests/{version.id}.json"))


def rewrite(repo: Repo, doc: dict) -> None:
    forge_manifest(repo, doc["id"], json.dumps(doc).encode())


@pytest.mark.parametrize(
    "digest", ["../../../../tmp/escape", "/etc/passwd", "ab" * 17, "zz" * 16, 12345]
)
def test_chunk_names_outside_the_blob_namespace_are_refused(digest) -> None:
    repo, doc = committed("traversal")
    doc["tensors"][0]["chunks"][0][0] = digest
    rewrite(repo, doc)
    with pytest.raises(CorruptCheckpoint, match="malformed chunk"):
        repo.load()


def test_absurd_shapes_are_refused_before_allocating() -> None:
    repo, doc = committed("bomb-shape")
    doc["tensors"][0]["shape"] = [10**9, 10**9]
    rewrite(repo, doc)
    with pytest.raises(CorruptCheckpoint, match=r"needs|more elements than can exist"):
        repo.load()


@pytest.mark.parametrize("dtype", ["os.system", "object", "__import__", ""])
def test_unknown_dtypes_are_refused(dtype) -> None:
    repo, doc = committed("dtype")
    doc["tensors"][0]["dtype"] = dtype
    rewrite(repo, doc)
    with pytest.raises(CorruptCheckpoint, match="dtype"):
        repo.load()


def test_a_newer_manifest_format_is_refused_with_advice() -> None:
    repo, doc = committed("format")
    doc["format"] = 99
    rewrite(repo, doc)
    with pytest.raises(CorruptCheckpoint, match="format 99 is not supported"):
        repo.load()


def test_a_pickle_payload_blob_is_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    repo, doc = committed("pickle")
    digest = doc["tensors"][0]["chunks"][0][0]
    payload = pickle.dumps(Exploit())
    repo.store.put(blob_key(digest), payload)
    doc["tensors"][0]["chunks"][0][2] = len(payload)  # stored size matches the payload
    rewrite(repo, doc)
    with pytest.raises(CorruptCheckpoint, match="not a cloudckpt blob"):
        repo.load()
    assert not marker.exists()


def test_a_decompression_bomb_is_stopped_at_the_declared_size() -> None:
    repo, doc = committed("zbomb")
    chunk = doc["tensors"][0]["chunks"][0]
    digest, size = chunk[0], chunk[1]
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(512 << 20))  # 512 MiB of zeros
    # A valid header for a one-plane zstd blob of the declared size, then the bomb.
    blob = struct.pack("<4sBBHQ", b"CKB1", 1, 1, 1, size) + struct.pack("<BQ", 1, len(bomb)) + bomb
    repo.store.put(blob_key(digest), blob)
    chunk[2] = len(blob)
    rewrite(repo, doc)
    with pytest.raises(CorruptCheckpoint, match=r"cannot decompress|decompressed to|declares"):
        repo.load()


def test_a_flipped_byte_is_caught_by_the_hash() -> None:
    repo, doc = committed("bitrot")
    key = blob_key(doc["tensors"][0]["chunks"][0][0])
    blob = bytearray(repo.store.get(key))
    blob[-1] ^= 0x01
    repo.store.put(key, bytes(blob))
    with pytest.raises(CorruptCheckpoint, match=key):
        repo.load()


def test_a_damaged_parent_manifest_does_not_block_new_commits() -> None:
    repo, doc = committed("damaged-parent")
    doc["tensors"][0]["chunks"][0][0] = "../escape"
    rewrite(repo, doc)
    state = {"w": torch.ones(8), "step": 2}
    repo.commit(state)
    assert torch.equal(repo.load()["w"], state["w"])
