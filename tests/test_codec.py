"""Codec: every codec round-trips; blobs are self-describing; bad blobs are refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from cloudckpt import codec
from cloudckpt.errors import CorruptCheckpoint


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


CASES = [
    torch.randn(10_000),
    torch.randn(4097).to(torch.bfloat16),
    torch.randn(3000).to(torch.float16),
    torch.randn(999, dtype=torch.float64),
    torch.randint(-1000, 1000, (5000,)),
    torch.rand(3000) > 0.5,
    torch.zeros(70_000),  # highly compressible, exercises the zstd path of every plane
    torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, -3.4e38] * 200),
]


@pytest.mark.parametrize("t", CASES, ids=lambda t: f"{t.dtype}-{t.numel()}")
def test_round_trip_is_bit_exact(t: torch.Tensor) -> None:
    raw = raw_bytes(t)
    choice = codec.choose(str(t.dtype).removeprefix("torch."), t.element_size(), raw.nbytes)
    blob = codec.Codec().encode(memoryview(raw), choice)
    out = codec.Codec().decode(blob, raw.nbytes, "test")
    assert out.tobytes() == raw.tobytes()


def test_choices_by_dtype() -> None:
    assert codec.choose("float32", 4, 1 << 20).name == codec.FPLANES
    assert codec.choose("bfloat16", 2, 1 << 20).name == codec.FPLANES
    assert codec.choose("float16", 2, 1 << 20).name == codec.PLANES
    assert codec.choose("int64", 8, 1 << 20).name == codec.PLANES
    assert codec.choose("uint8", 1, 1 << 20).name == codec.ZSTD
    assert codec.choose("float32", 4, 16).name == codec.RAW


def test_float_planes_beat_plain_zstd_on_gaussian_weights() -> None:
    import zstandard

    w = (torch.randn(1 << 18) * 0.02).to(torch.bfloat16)
    raw = raw_bytes(w)
    blob = codec.Codec().encode(memoryview(raw), codec.choose("bfloat16", 2, raw.nbytes))
    plain = zstandard.ZstdCompressor(level=1).compress(raw.tobytes())
    assert len(blob) < 0.95 * len(plain)


def test_blob_decodes_without_knowing_its_dtype() -> None:
    # The same bytes stored as fp32 are read back by a chunk of another dtype.
    raw = raw_bytes(torch.randn(1000))
    blob = codec.Codec().encode(memoryview(raw), codec.choose("float32", 4, raw.nbytes))
    assert codec.Codec().decode(blob, raw.nbytes, "x").tobytes() == raw.tobytes()


def test_hash_is_stable_and_content_based() -> None:
    a = codec.content_hash(b"abc")
    assert a == codec.content_hash(memoryview(b"abc")) and a != codec.content_hash(b"abd")
    assert len(a) == 32


def _blob() -> tuple[bytes, np.ndarray]:
    raw = raw_bytes(torch.randn(4096))
    blob = codec.Codec().encode(memoryview(raw), codec.choose("float32", 4, raw.nbytes))
    return bytes(blob), raw


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b"XXXX" + b[4:], "bad header"),
        (lambda b: b + b"extra", "trailing"),
    ],
)
def test_damaged_blob_is_refused(mangle, message) -> None:
    blob, raw = _blob()
    with pytest.raises(CorruptCheckpoint, match=message):
        codec.Codec().decode(mangle(blob), raw.nbytes, "blobs/ab/abcd")


def test_length_mismatch_is_refused_before_decompressing() -> None:
    blob, raw = _blob()
    with pytest.raises(CorruptCheckpoint, match="manifest expects"):
        codec.Codec().decode(blob, raw.nbytes * 1000, "blobs/ab/abcd")


@pytest.mark.parametrize("declared", [2**40, 2**63, 4096 + 1])
def test_a_frame_that_declares_another_length_is_refused_before_allocating(declared) -> None:
    # zstandard sizes its output by a frame's declared content size (max_output_size
    # bounds only frames without one): 2**40 used to be a MemoryError, not a refusal.
    frame = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", declared)
    frame += (1 | 1 << 1 | 4096 << 3).to_bytes(3, "little") + b"\x00"  # last, RLE, 4 KiB
    blob = codec._HEADER.pack(codec.MAGIC, 1, 1, 1, 4096) + codec._PLANE.pack(1, len(frame))
    with pytest.raises(CorruptCheckpoint, match="declares"):
        codec.Codec().decode(blob + frame, 4096, "x")
    honest = frame[:5] + struct.pack("<Q", 4096) + frame[13:]
    out = codec.Codec().decode(blob + honest, 4096, "x")
    assert out.tobytes() == bytes(4096)
