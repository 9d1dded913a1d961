"""A blob read never takes more than its longest possible encoding (+1 byte), and sizes
are checked against the blobs' stored sizes before anything is allocated for them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cloudckpt import Repo, RepoOptions, StoreOptions, codec
from cloudckpt.blobs import BlobReader, blob_key
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint
from cloudckpt.store import Store

HERE = Path(__file__).parent
MiB = 1 << 20


# -- Store.get_buffer(limit) ---------------------------------------------------------------
@pytest.fixture
def store(backend: tuple[str, dict[str, Any]]) -> Store:
    uri, opts = backend
    return Store(uri, opts)


def test_a_bounded_read_returns_objects_up_to_the_limit_and_refuses_longer_ones(
    store: Store,
) -> None:
    store.put("ten", b"0123456789")
    store.put("empty", b"")
    assert bytes(store.get_buffer("ten", 10)) == b"0123456789"
    assert bytes(store.get_buffer("ten", 1000)) == b"0123456789"
    assert bytes(store.get_buffer("empty", 0)) == b""
    assert bytes(store.get_buffer("empty", 5)) == b""
    for limit in (9, 0):
        with pytest.raises(CorruptCheckpoint, match=rf"{store.url('ten')} is longer than"):
            store.get_buffer("ten", limit)
    with pytest.raises(CheckpointNotFound, match="missing"):
        store.get_buffer("missing", 10)


# -- peak memory of a load that meets a huge blob ------------------------------------------
def two_versions(uri: str, opts: dict[str, Any]) -> tuple[Repo, str, str, str]:
    """A good version and a bad one of 80 bytes each; returns the bad one's blob key."""
    repo = Repo(uri, opts)
    good = repo.commit({"w": torch.arange(20, dtype=torch.float32) + 1000})
    bad = repo.commit({"w": torch.arange(20, dtype=torch.float32)})
    doc = json.loads(repo.store.get(f"manifests/{bad.id}.json"))
    (chunk,) = doc["tensors"][0]["chunks"]
    assert chunk[1] == 80
    return repo, good.id, bad.id, blob_key(chunk[0])


def child_peak(uri: str, opts: dict[str, Any], good: str, bad: str, how: str, fast: bool) -> dict:
    arg = json.dumps({"storage_options": opts, "fast_path": fast})
    out = subprocess.run(
        [sys.executable, str(HERE / "child_bounded_read.py"), uri, arg, good, bad, how],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("how", ["reader", "load"])
def test_a_huge_blob_file_is_refused_without_reading_it(tmp_path: Path, how: str) -> None:
    size = 300 * MiB
    repo, good, bad, key = two_versions(f"file://{tmp_path}/repo", {})
    path = Path(repo.store.path(key))
    os.truncate(path, size)  # sparse: costs no disk, reads as 300 MiB
    assert path.stat().st_size == size
    found = child_peak(f"file://{tmp_path}/repo", {}, good, bad, how, fast=True)
    assert found["error"] is not None and found["error"].startswith("CorruptCheckpoint")
    assert key in found["error"]
    assert found["after"] - found["before"] < 32 * MiB, found  # not ~300 MiB


@pytest.mark.parametrize("fast", [True, False], ids=["obstore", "s3fs"])
def test_a_huge_blob_object_on_s3_is_refused_with_one_ranged_get(moto_server, fast: bool) -> None:
    size = 96 * MiB
    uri, opts = moto_server.fresh_uri("huge"), moto_server.storage_options()
    repo, good, bad, key = two_versions(uri, opts)
    repo.store.put(key, np.zeros(size, dtype=np.uint8).data)
    found = child_peak(uri, opts, good, bad, "reader", fast)
    assert found["error"] is not None and found["error"].startswith("CorruptCheckpoint")
    assert key in found["error"]
    assert found["after"] - found["before"] < 32 * MiB, found  # not ~96 MiB


# -- codec.max_raw ---------------------------------------------------------------------
def rle_blob(blocks: int) -> bytes:
    """The densest blob the format allows: one zstd frame of ``blocks`` RLE blocks, each
    4 bytes decoding to 128 KiB (the most a block may hold)."""
    raw = blocks * 128 * 1024
    frame = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x88])  # magic, descriptor, 128 MiB window
    for i in range(blocks):
        header = (i == blocks - 1) | (1 << 1) | (128 * 1024 << 3)  # last?, RLE, size
        frame += header.to_bytes(3, "little") + b"\x00"
    return struct.pack("<4sBBHQ", b"CKB1", 1, 1, 1, raw) + struct.pack("<BQ", 1, len(frame)) + frame


@pytest.mark.parametrize("blocks", [1, 2, 64])
def test_max_raw_is_reached_by_the_densest_blob_the_format_allows(blocks: int) -> None:
    blob = rle_blob(blocks)
    raw = codec.max_raw(len(blob))
    assert raw == blocks * 128 * 1024
    out = codec.Codec().decode(blob, raw, "rle")
    assert not out.any()
    assert codec.max_raw(len(blob) - 1) < raw  # one byte less could not hold it


def test_a_zstd_block_claiming_more_than_128_kib_is_refused_by_the_decoder() -> None:
    blob = bytearray(rle_blob(1))
    header = 1 | (1 << 1) | ((128 * 1024 + 1) << 3)
    blob[-4:-1] = header.to_bytes(3, "little")
    blob[12:20] = struct.pack("<Q", 128 * 1024 + 1)
    with pytest.raises(CorruptCheckpoint):
        codec.Codec().decode(bytes(blob), 128 * 1024 + 1, "rle")


CHOICES = [
    codec.CodecChoice(codec.RAW, 1),
    codec.CodecChoice(codec.ZSTD, 1),
    codec.CodecChoice(codec.PLANES, 2),
    codec.CodecChoice(codec.PLANES, 8),
    codec.CodecChoice(codec.FPLANES, 2),
    codec.CodecChoice(codec.FPLANES, 4),
]


@pytest.mark.parametrize("level", [1, 19, -5])
@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: f"{c.name}{c.width}")
def test_real_blobs_fit_both_bounds(choice: codec.CodecChoice, level: int) -> None:
    c = codec.Codec(level)
    rng = np.random.default_rng(0)
    for n in (8, 256, 4096, MiB, 16 * MiB):
        for data in (np.zeros(n, np.uint8), np.full(n, 0x3F, np.uint8), rng.bytes(min(n, MiB))):
            raw = np.frombuffer(bytes(data), np.uint8)
            if raw.size % choice.width:
                continue
            blob = c.encode(memoryview(raw), choice)
            assert len(blob) <= codec.max_stored(raw.size)
            assert raw.size <= codec.max_raw(len(blob)), (choice, level, raw.size, len(blob))


def test_max_raw_of_tiny_sizes() -> None:
    assert [codec.max_raw(n) for n in (0, 15, 16, 17, 30)] == [0, 0, 0, 1, 14]
    assert codec.max_raw(35) == 128 * 1024
    assert all(codec.max_raw(n) <= codec.max_raw(n + 1) for n in range(0, 5000))
    assert codec.max_raw(1 << 30) < (1 << 30) * 32768


# -- BlobReader.check_sizes ------------------------------------------------------------
def committed(uri: str, opts: dict[str, Any] | None = None) -> tuple[Repo, dict]:
    repo = Repo(uri, opts, options=RepoOptions(store=StoreOptions()))
    state = {"w": torch.randn(64, 64), "b": torch.zeros(4096), "step": 1}
    version = repo.commit(state)
    return repo, json.loads(repo.store.get(f"manifests/{version.id}.json"))


def memory_repo(name: str) -> tuple[Repo, dict]:
    return committed(f"memory://check-sizes/{name}-{uuid.uuid4().hex}")


def test_check_sizes_passes_a_sound_version() -> None:
    repo, doc = memory_repo("ok")
    assert BlobReader(repo.store, repo.options.transfer).check_sizes(doc["tensors"]) is None


def test_check_sizes_names_a_missing_blob() -> None:
    repo, doc = memory_repo("missing")
    key = blob_key(doc["tensors"][0]["chunks"][0][0])
    repo.store.delete([key])
    with pytest.raises(CorruptCheckpoint, match=rf"{key}.*is missing"):
        BlobReader(repo.store, repo.options.transfer).check_sizes(doc["tensors"])


def test_check_sizes_refuses_a_blob_longer_than_any_encoding() -> None:
    repo, doc = memory_repo("long")
    chunk = doc["tensors"][0]["chunks"][0]
    key = blob_key(chunk[0])
    repo.store.put(key, bytes(codec.max_stored(chunk[4]) + 1))
    with pytest.raises(CorruptCheckpoint, match=rf"{key}.*more than any encoding"):
        BlobReader(repo.store, repo.options.transfer).check_sizes(doc["tensors"])


def test_check_sizes_refuses_a_raw_size_no_stored_blob_could_hold() -> None:
    repo, doc = memory_repo("inflated")
    entry = doc["tensors"][0]
    chunk = entry["chunks"][0]
    stored = repo.store.stat(blob_key(chunk[0])).size
    chunk[4] = codec.max_raw(stored) + 1  # the blob's raw size; 1 TiB would do as well
    with pytest.raises(CorruptCheckpoint, match=rf"{chunk[0]}.*cannot decode to"):
        BlobReader(repo.store, repo.options.transfer).check_sizes([entry])
    chunk[4] = codec.max_raw(stored)  # the densest encoding could hold it: accepted
    BlobReader(repo.store, repo.options.transfer).check_sizes([entry])


def test_check_sizes_heads_each_distinct_blob_once(moto_server) -> None:
    from conftest import S3Requests

    repo, doc = committed(moto_server.fresh_uri("heads"), moto_server.storage_options())
    blobs = {c[0] for e in doc["tensors"] for c in e["chunks"]}
    requests = S3Requests(repo.store)
    reader = BlobReader(repo.store, repo.options.transfer)
    reader.check_sizes(doc["tensors"] + doc["tensors"])
    assert requests.count("HEAD", "blobs/") == len(blobs)
    assert requests.count("GET") == 0
