"""Codec: every codec round-trips; blobs are self-describing; bad blobs are refused."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from cloudckpt import codec, float_planes
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


# -- float planes made through libzstd's experimental parameters (issue 20) --------------
FIXTURES = Path(__file__).parent / "fixtures" / "codec1"


def _float_blob(dtype: torch.dtype, n: int = 3000) -> tuple[bytes, np.ndarray]:
    g = torch.Generator().manual_seed(20)
    t = (torch.randn(n, generator=g) * 0.02).to(dtype)
    t[::7] = 0  # some zero runs: the mantissa planes go through zstd too
    raw = raw_bytes(t)
    name = str(dtype).removeprefix("torch.")
    blob = codec.Codec().encode(memoryview(raw), codec.choose(name, t.element_size(), raw.nbytes))
    return bytes(blob), raw


def test_the_fast_float_encoder_is_in_use() -> None:
    # The pinned dependencies (zstandard with its cffi backend, cffi) reach libzstd's
    # experimental parameters; without them the codec falls back, twice as slow.
    assert float_planes.Literals.get().fast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 4096, 70_000, 200_003])
def test_float_planes_round_trip_at_every_size(dtype: torch.dtype, n: int) -> None:
    # Sizes around the raw threshold, the one-frame planes and the sampled planes.
    for t in (torch.randn(n) * 0.02, torch.zeros(n), torch.full((n,), float("nan"))):
        raw = raw_bytes(t.to(dtype))
        name = str(dtype).removeprefix("torch.")
        choice = codec.choose(name, raw.nbytes // n, raw.nbytes)
        blob = codec.Codec().encode(memoryview(raw), choice)
        assert len(blob) <= codec.max_stored(raw.nbytes)
        assert raw.nbytes <= codec.max_raw(len(blob))
        assert codec.Codec().decode(blob, raw.nbytes, "x").tobytes() == raw.tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fallback_encoder_writes_the_same_format(dtype, monkeypatch) -> None:
    def no_backend() -> None:
        raise ImportError("no cffi")

    monkeypatch.setattr(float_planes, "literals_context", no_backend)
    slow = float_planes.Literals()
    assert not slow.fast
    monkeypatch.setattr(float_planes.Literals, "get", classmethod(lambda cls: slow))
    blob, raw = _float_blob(dtype, 50_000)
    assert blob[4] == 3  # fplanes
    assert codec.Codec().decode(blob, raw.nbytes, "x").tobytes() == raw.tobytes()


def test_blobs_of_every_codec_id_from_the_previous_encoder_still_decode() -> None:
    index = json.loads((FIXTURES / "index.json").read_text())
    assert {e["codec"] for e in index.values()} == {"raw", "zstd", "planes", "fplanes"}
    for name, entry in index.items():
        blob = (FIXTURES / f"{name}.blob").read_bytes()
        out = codec.Codec().decode(blob, entry["raw_len"], name)
        assert codec.content_hash(out) == entry["xxh3_128"], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_new_float_blobs_decode_with_the_previous_decoder_too(dtype) -> None:
    # Same format, same codec id: the encoder changed, not what readers must know.
    blob, raw = _float_blob(dtype, 100_000)
    assert blob[4] == 3
    header = codec._HEADER.size
    view, pos, kinds = memoryview(blob), header, []
    for _ in range(blob[5]):
        kind, stored = codec._PLANE.unpack_from(view, pos)
        kinds.append(kind)
        if kind == 1:  # a plain zstd frame of the plane's length
            frame = bytes(view[pos + codec._PLANE.size : pos + codec._PLANE.size + stored])
            params = zstandard.get_frame_parameters(frame)
            assert params.content_size == raw.nbytes // blob[5]
            assert len(zstandard.ZstdDecompressor().decompress(frame)) == params.content_size
        pos += codec._PLANE.size + stored
    assert kinds[0] == 1 and pos == len(blob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_truncation_of_a_float_blob_is_refused(dtype) -> None:
    blob, raw = _float_blob(dtype)
    for end in range(len(blob)):
        with pytest.raises(CorruptCheckpoint):
            codec.Codec().decode(blob[:end], raw.nbytes, "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_forged_byte_of_a_float_blob_is_refused_or_keeps_the_length(dtype) -> None:
    # A changed byte either fails decoding with CorruptCheckpoint or decodes to exactly
    # the declared length (a raw mantissa byte: the content hash catches that one).
    blob, raw = _float_blob(dtype)
    refused = 0
    for i in range(len(blob)):
        for flip in (0x01, 0x80, 0xFF):
            forged = bytearray(blob)
            forged[i] ^= flip
            try:
                out = codec.Codec().decode(bytes(forged), raw.nbytes, "x")
            except CorruptCheckpoint:
                refused += 1
                continue
            assert out.size == raw.nbytes
    assert refused > 0


def test_forged_plane_lengths_are_refused_before_allocating() -> None:
    blob, raw = _float_blob(torch.float32)
    header = codec._HEADER.size
    for stored in (0, 1, 2**32, 2**63):
        forged = bytearray(blob)
        codec._PLANE.pack_into(forged, header, 1, stored)
        with pytest.raises(CorruptCheckpoint):
            codec.Codec().decode(bytes(forged), raw.nbytes, "x")


def test_float_blobs_from_many_threads_at_once_round_trip() -> None:
    shared = codec.Codec()
    blobs = {dtype: _float_blob(dtype, 300_000) for dtype in (torch.float32, torch.bfloat16)}

    def work(dtype: torch.dtype) -> bool:
        expected, raw = blobs[dtype]
        name = str(dtype).removeprefix("torch.")
        choice = codec.choose(name, raw.nbytes // 300_000, raw.nbytes)
        for _ in range(5):
            blob = shared.encode(memoryview(raw), choice)
            if bytes(blob) != expected:
                return False
            if shared.decode(blob, raw.nbytes, "x").tobytes() != raw.tobytes():
                return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, [torch.float32, torch.bfloat16] * 8))


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


@pytest.mark.parametrize("n", [1, 2, 64, 5000])
def test_encoding_never_writes_into_the_raw_bytes(n) -> None:
    # Made planes are reused as scratch for the next gathers; a view of the caller's
    # bytes never is, whatever the size.
    raw = raw_bytes(torch.randn(n) * 0.02)
    before = raw.tobytes()
    blob = codec.Codec().encode(memoryview(raw), codec.CodecChoice(codec.FPLANES, 4))
    assert raw.tobytes() == before
    assert codec.Codec().decode(blob, raw.nbytes, "x").tobytes() == before


@pytest.mark.parametrize("width", [0, 1])
def test_a_float_blob_forged_to_another_width_is_refused(width) -> None:
    # fplanes needs the top two bytes of an element: width 1 was an IndexError.
    n = 3072
    blob = codec._HEADER.pack(codec.MAGIC, 3, width, width, n)
    blob += (codec._PLANE.pack(0, n) + bytes(n)) * width
    with pytest.raises(CorruptCheckpoint, match="plane layout"):
        codec.Codec().decode(blob, n, "x")


def test_the_compiled_float_planes_are_in_use() -> None:
    # `pip install` builds cloudckpt._planes with the machine's C compiler; without one
    # the codec falls back to numpy (the same bytes, 4-7x slower split and join).
    assert float_planes.COMPILED


def _every_float(dtype: torch.dtype) -> torch.Tensor:
    """Every bf16 bit pattern, or fp32 values of every exponent and sign with random
    mantissas, the special values among them."""
    if dtype == torch.bfloat16:
        return torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.bfloat16)
    words = torch.randint(0, 2**23, (2**9 * 64,), dtype=torch.int64)
    words |= torch.arange(2**9).repeat_interleave(64) << 23  # sign and exponent
    return words.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_and_numpy_planes_make_and_read_the_same_bytes(dtype, monkeypatch) -> None:
    raw = raw_bytes(_every_float(dtype))
    elems = raw.reshape(-1, raw.nbytes // _every_float(dtype).numel())
    compiled = [p.copy() for p in float_planes.split(elems)]
    monkeypatch.setattr(float_planes, "_planes", None)
    numpy_made = [np.ascontiguousarray(p) for p in float_planes.split(elems)]
    assert [p.tobytes() for p in compiled] == [p.tobytes() for p in numpy_made]
    assert len(compiled) == elems.shape[1]
    out = np.empty_like(elems)
    float_planes.join(compiled, out)
    assert out.tobytes() == raw.tobytes()
    monkeypatch.undo()
    out[:] = 0
    float_planes.join(numpy_made, out)
    assert out.tobytes() == raw.tobytes()
    # A blob made by either path decodes by the other.
    choice = codec.choose(str(dtype).removeprefix("torch."), elems.shape[1], raw.nbytes)
    blob = bytes(codec.Codec().encode(memoryview(raw), choice))
    monkeypatch.setattr(float_planes, "_planes", None)
    assert codec.Codec().decode(blob, raw.nbytes, "x").tobytes() == raw.tobytes()
    assert bytes(codec.Codec().encode(memoryview(raw), choice)) == blob


def test_the_compiled_planes_refuse_buffers_of_the_wrong_size() -> None:
    from cloudckpt import _planes

    elems = np.zeros(40, dtype=np.uint8)
    planes = [np.zeros(10, dtype=np.uint8) for _ in range(4)]
    with pytest.raises(ValueError, match="bytes"):
        _planes.split_fp32(elems, *planes[:3], np.zeros(9, dtype=np.uint8))
    with pytest.raises(ValueError, match="not a multiple of 4"):
        _planes.split_fp32(elems[:39], *planes)
    with pytest.raises(ValueError, match="bytes"):
        _planes.join_fp32(*planes, np.zeros(41, dtype=np.uint8))
    with pytest.raises((TypeError, BufferError)):  # read-only output
        _planes.join_bf16(planes[0], planes[1], bytes(20))
    with pytest.raises(TypeError, match="expected 3"):
        _planes.join_bf16(planes[0], planes[1])


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("t", CASES, ids=lambda t: f"{t.dtype}-{t.numel()}")
def test_decoding_checks_the_hash_when_given_one(t, compiled, monkeypatch) -> None:
    """The float planes are hashed as they are joined; every codec refuses bytes that
    do not match the digest, and accepts those that do."""
    if not compiled:
        monkeypatch.setattr(float_planes, "_planes", None)
    raw = raw_bytes(t)
    choice = codec.choose(str(t.dtype).removeprefix("torch."), t.element_size(), raw.nbytes)
    blob = bytes(codec.Codec().encode(memoryview(raw), choice))
    out = np.empty(raw.nbytes, dtype=np.uint8)
    codec.Codec().decode_into(blob, out, "x", codec.content_hash(memoryview(raw)))
    assert out.tobytes() == raw.tobytes()
    other = codec.content_hash(b"something else")
    with pytest.raises(CorruptCheckpoint, match="does not match its hash"):
        codec.Codec().decode_into(blob, out, "x", other)
    # A strided destination is refused up front, with or without a digest.
    wide = np.zeros(2 * raw.nbytes, dtype=np.uint8)
    with pytest.raises(ValueError, match="contiguous"):
        codec.Codec().decode_into(blob, wide[::2], "x", codec.content_hash(memoryview(raw)))
