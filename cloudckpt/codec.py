"""Chunk codecs: raw bytes -> self-describing compressed blob, and back.

A blob is ``header | payload``. The header names the codec, the element width and the
raw length, so any blob decodes on its own and a blob stored under one codec can be
reused by a later chunk with the same bytes but another dtype.

Codecs:

* ``raw``    -- stored as is.
* ``zstd``   -- one zstd frame.
* ``planes`` -- byte planes (byte k of every element together), each plane a zstd frame
  or stored raw when zstd does not help. Good for integers and fp16/fp64.
* ``fplanes`` -- like ``planes`` for fp32/bf16, but the sign bit is moved out of the
  top byte first, so that one plane holds exactly the 8-bit exponent. Trained weights
  have a narrow exponent range, so that plane compresses well, while the mantissa
  planes are close to random and are stored raw without spending CPU on them.

The float planes are made, joined and compressed by ``cloudckpt.float_planes``: zstd
frames made with literal (Huffman) compression forced on and a matcher that hardly
searches, the format every reader of ``fplanes`` decodes (codec id 3, unchanged).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash
import zstandard

from cloudckpt import float_planes
from cloudckpt.errors import CorruptCheckpoint

if TYPE_CHECKING:  # imported where bytes are coded, not at import
    import numpy as np

MAGIC = b"CKB1"
_HEADER = struct.Struct("<4sBBHQ")  # magic, codec id, width, plane count, raw length
_PLANE = struct.Struct("<BQ")  # 0 raw / 1 zstd, stored length

RAW, ZSTD, PLANES, FPLANES = "raw", "zstd", "planes", "fplanes"
#: The most planes a blob has (one per byte of the widest element).
_MAX_PLANES = 8


#: Bytes before an uncompressed blob's payload.
RAW_HEADER = _HEADER.size  # the ids are defined below; RAW's is 0


def raw_payload(header: bytes | memoryview, raw_len: int) -> bool:
    """Whether a blob starting with ``header`` (its first :data:`RAW_HEADER` bytes) is an
    uncompressed blob of ``raw_len`` bytes: its payload is then the rest of it as is."""
    if len(header) != _HEADER.size:
        return False
    magic, codec_id, width, nplanes, n = _HEADER.unpack(bytes(header))
    return magic == MAGIC and codec_id == 0 and width == 1 and nplanes == 0 and n == raw_len


def max_stored(raw_len: int) -> int:
    """The largest blob any encoding of ``raw_len`` bytes makes: a stored plane is never
    larger than its raw bytes. Blobs are named by their raw bytes, so the same name may
    hold another encoding (another dtype's codec, another level) of the same bytes."""
    return _HEADER.size + _MAX_PLANES * _PLANE.size + raw_len


#: The most bytes one zstd block decodes to (the format's Block_Maximum_Size, 128 KiB;
#: libzstd refuses a block that claims more, RLE blocks included).
_ZSTD_BLOCK = 128 * 1024
#: The fewest bytes of a zstd block that decodes to anything: an RLE block, its 3-byte
#: header and the byte it repeats.
_ZSTD_MIN_BLOCK = 4
#: The fewest bytes of a zstd frame before its first block: magic number (4), frame
#: header descriptor (1), and a window descriptor or a one-byte content size (1).
_ZSTD_MIN_FRAME_HEADER = 6


def max_raw(stored: int) -> int:
    """The largest raw length a blob of ``stored`` bytes decodes to, under any codec.

    ``raw`` holds ``stored - header`` bytes. A zstd frame of ``F`` bytes decodes to at
    most ``(F - 6) // 4`` blocks of 128 KiB: every block that yields anything takes at
    least 4 bytes (an RLE block) and yields at most 128 KiB, so zstd never exceeds
    32,768:1 (level 19 on zeros reaches about 31,700:1). Byte planes cannot do better:
    every plane decodes to the same length, and each adds its own plane and frame
    headers. Smaller than a header, a blob holds nothing (0).
    """
    if stored < _HEADER.size:
        return 0
    frame = stored - _HEADER.size - _PLANE.size
    blocks = max(0, (frame - _ZSTD_MIN_FRAME_HEADER) // _ZSTD_MIN_BLOCK)
    return max(stored - _HEADER.size, blocks * _ZSTD_BLOCK)


_IDS = {RAW: 0, ZSTD: 1, PLANES: 2, FPLANES: 3}
_NAMES = {v: k for k, v in _IDS.items()}

#: Planes smaller than this are not worth a zstd frame.
_MIN_COMPRESS = 256
#: A plane is compressed only if a sample of it shrinks below this ratio.
_SAMPLE_BYTES = 1 << 16
_SAMPLE_RATIO = 0.97


@dataclass(frozen=True)
class CodecChoice:
    """Which codec a chunk of one dtype gets, and the element width it groups by."""

    name: str
    width: int


def content_hash(raw: memoryview | bytes) -> str:
    """The content address of raw chunk bytes (xxh3-128, hex)."""
    return xxhash.xxh3_128_hexdigest(raw)


def choose(dtype_name: str, itemsize: int, nbytes: int) -> CodecChoice:
    """Pick the codec for a chunk of ``nbytes`` of elements of ``dtype_name``."""
    if nbytes < _MIN_COMPRESS:
        return CodecChoice(RAW, 1)
    if dtype_name in ("float32", "bfloat16"):
        return CodecChoice(FPLANES, itemsize)
    if itemsize > 1:
        return CodecChoice(PLANES, itemsize)
    return CodecChoice(ZSTD, 1)


class Codec:
    """Encodes and decodes chunks; thread-safe (a zstd context per call, and one libzstd
    context per thread for float planes). ``level`` is the zstd level of the ``planes``
    and ``zstd`` codecs; float planes always use ``float_planes.Literals``."""

    def __init__(self, level: int = 1) -> None:
        self.level = level

    # -- encode ---------------------------------------------------------------------
    def encode(self, raw: memoryview | bytes, choice: CodecChoice) -> memoryview:
        """Compress ``raw`` (a contiguous byte buffer) into a self-describing blob."""
        import numpy as np

        data = np.frombuffer(raw, dtype=np.uint8)
        n = data.size
        if choice.name == RAW:
            return memoryview(_HEADER.pack(MAGIC, _IDS[RAW], 1, 0, n) + bytes(raw))
        if choice.name == ZSTD:
            planes: Iterator[np.ndarray] = iter([data])
            count = 1
        else:
            width = count = choice.width
            if n % width:
                raise ValueError(f"chunk of {n} bytes is not a multiple of width {width}")
            elems = data.reshape(-1, width)
            planes = float_planes.split(elems) if choice.name == FPLANES else _split(elems)
        # A stored plane is never larger than its raw bytes, so the blob fits in a buffer
        # of the raw size plus headers; planes are written straight into it.
        out = np.empty(_HEADER.size + count * _PLANE.size + n, dtype=np.uint8)
        _HEADER.pack_into(out, 0, MAGIC, _IDS[choice.name], choice.width, count, n)
        pos = _HEADER.size
        if choice.name == FPLANES:
            literals = float_planes.Literals.get()
            scratch = None
            for plane in planes:
                pos = _encode_literal_plane(literals, plane, out, pos, scratch)
                if count > 2 and plane.flags.owndata:  # made here, not a view of ``raw``:
                    scratch = plane  # done with, it takes the mantissa planes' gathers
                del plane
            return memoryview(out)[:pos]
        cctx = zstandard.ZstdCompressor(level=self.level)
        for plane in planes:
            pos = self._encode_plane(cctx, plane, out, pos)
            del plane  # planes are made one at a time: hold one scratch plane at most
        return memoryview(out)[:pos]

    @staticmethod
    def _encode_plane(
        cctx: zstandard.ZstdCompressor, plane: np.ndarray, out: np.ndarray, pos: int
    ) -> int:
        """Write one plane (its header and payload) at ``out[pos:]``; returns the end."""
        import numpy as np

        size = plane.size
        body = pos + _PLANE.size
        if size >= _MIN_COMPRESS and _worth_compressing(cctx, plane):
            packed = cctx.compress(np.ascontiguousarray(plane))
            if len(packed) < size:
                _PLANE.pack_into(out, pos, 1, len(packed))
                out[body : body + len(packed)] = np.frombuffer(packed, dtype=np.uint8)
                return body + len(packed)
        _PLANE.pack_into(out, pos, 0, size)
        out[body : body + size] = plane  # a strided plane is gathered here, in one copy
        return body + size

    # -- decode ---------------------------------------------------------------------
    def decode(self, blob: bytes | memoryview, raw_len: int, where: str) -> np.ndarray:
        """Decompress a blob into a fresh uint8 array of exactly ``raw_len`` bytes.

        ``where`` names the object in errors. Lengths are checked against ``raw_len``
        before anything is allocated, so a hostile blob cannot inflate memory.
        """
        import numpy as np

        out = np.empty(raw_len, dtype=np.uint8)
        self.decode_into(blob, out, where)
        return out

    def decode_into(
        self, blob: bytes | memoryview, out: np.ndarray, where: str, digest: str | None = None
    ) -> None:
        """Decompress a blob into ``out`` (a contiguous uint8 array of the raw length).

        With ``digest``, the raw bytes are checked against it (CorruptCheckpoint if they
        differ): float planes are hashed as they are joined, while still in the cache.
        """
        if not out.flags.c_contiguous:
            raise ValueError("decode_into: out must be a contiguous uint8 array")
        hasher = xxhash.xxh3_128() if digest is not None else None
        hashed = self._decode(memoryview(blob), out, where, hasher)
        if hasher is not None:
            found = hasher.hexdigest() if hashed else content_hash(memoryview(out))
            if found != digest:
                raise CorruptCheckpoint(f"{where}: content does not match its hash")

    def _decode(
        self, view: memoryview, out: np.ndarray, where: str, hasher: xxhash.xxh3_128 | None
    ) -> bool:
        """Decode into ``out``; True if ``hasher`` was fed every raw byte on the way."""
        import numpy as np

        if len(view) < _HEADER.size:
            raise CorruptCheckpoint(f"{where}: blob is truncated ({len(view)} bytes)")
        magic, codec_id, width, nplanes, n = _HEADER.unpack_from(view)
        if magic != MAGIC or codec_id not in _NAMES:
            raise CorruptCheckpoint(f"{where}: not a cloudckpt blob (bad header)")
        if n != out.size:
            raise CorruptCheckpoint(
                f"{where}: blob holds {n} bytes but the manifest expects {out.size}"
            )
        name = _NAMES[codec_id]
        body = view[_HEADER.size :]
        if name == RAW:
            if len(body) != n:
                raise CorruptCheckpoint(f"{where}: raw blob has {len(body)} of {n} bytes")
            out[:] = np.frombuffer(body, dtype=np.uint8)
            return False
        if name == ZSTD:
            width, expected = 1, [n]
        else:
            if width == 0 or n % width or nplanes != width or (name == FPLANES and width < 2):
                raise CorruptCheckpoint(f"{where}: inconsistent plane layout")
            expected = [n // width] * width
        planes = _read_planes(body, expected, where)
        if name == ZSTD:
            out[:] = planes[0]
            return False
        elems = out.reshape(-1, width)
        if name == FPLANES:
            return float_planes.join(planes, elems, hasher)
        _join(planes, elems)
        return False


def _worth_compressing(cctx: zstandard.ZstdCompressor, plane: np.ndarray) -> bool:
    import numpy as np

    if plane.size <= 2 * _SAMPLE_BYTES:
        return True
    sample = np.ascontiguousarray(plane[:_SAMPLE_BYTES])
    return len(cctx.compress(sample)) < _SAMPLE_RATIO * sample.size


def _encode_literal_plane(
    literals: float_planes.Literals,
    plane: np.ndarray,
    out: np.ndarray,
    pos: int,
    scratch: np.ndarray | None = None,
) -> int:
    """Write one float plane (its header and payload) at ``out[pos:]``; returns the end.
    The frame is written straight into ``out`` and kept only if smaller than the plane.
    A strided plane to compress is gathered into ``scratch`` (its size) when given."""
    import numpy as np

    size = plane.size
    body = pos + _PLANE.size
    if size >= _MIN_COMPRESS:
        if size > 2 * _SAMPLE_BYTES:
            sample = np.ascontiguousarray(plane[:_SAMPLE_BYTES])
            frame = np.empty(_SAMPLE_BYTES, dtype=np.uint8)
            worth = 0 < literals.compress_into(sample, frame) < _SAMPLE_RATIO * _SAMPLE_BYTES
        else:
            worth = True
        if worth:
            if plane.flags.c_contiguous:
                src = plane
            elif scratch is not None:
                src = scratch
                np.copyto(src, plane)
            else:
                src = np.ascontiguousarray(plane)
            packed = literals.compress_into(src, out[body : body + size - 1])
            if packed:
                _PLANE.pack_into(out, pos, 1, packed)
                return body + packed
    _PLANE.pack_into(out, pos, 0, size)
    out[body : body + size] = plane  # a strided plane is gathered here, in one copy
    return body + size


def _split(elems: np.ndarray) -> Iterator[np.ndarray]:
    """Byte planes, most significant first: strided views of ``elems``, (n, width)
    little-endian."""
    for k in range(elems.shape[1] - 1, -1, -1):
        yield elems[:, k]


def _join(planes: list[np.ndarray], out: np.ndarray) -> None:
    width = out.shape[1]
    for i, plane in enumerate(planes):
        out[:, width - 1 - i] = plane


def _read_planes(body: memoryview, expected: list[int], where: str) -> list[np.ndarray]:
    import numpy as np

    dctx = zstandard.ZstdDecompressor()
    planes = []
    pos = 0
    for size in expected:
        if pos + _PLANE.size > len(body):
            raise CorruptCheckpoint(f"{where}: blob is truncated")
        kind, stored = _PLANE.unpack_from(body, pos)
        pos += _PLANE.size
        payload = body[pos : pos + stored]
        pos += stored
        if len(payload) != stored:
            raise CorruptCheckpoint(f"{where}: blob is truncated")
        if kind == 0:
            if stored != size:
                raise CorruptCheckpoint(f"{where}: plane has {stored} of {size} bytes")
            planes.append(np.frombuffer(payload, dtype=np.uint8))
            continue
        try:
            # A frame that declares its length gets an output buffer of that length from
            # zstandard (max_output_size bounds only frames that do not): a forged
            # declaration must not become an allocation.
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, size):
                raise CorruptCheckpoint(f"{where}: a plane's frame declares {declared} of {size}")
            plain = dctx.decompress(payload, max_output_size=size)
        except zstandard.ZstdError as e:
            raise CorruptCheckpoint(f"{where}: cannot decompress ({e})") from None
        if len(plain) != size:
            raise CorruptCheckpoint(f"{where}: plane decompressed to {len(plain)} of {size}")
        planes.append(np.frombuffer(plain, dtype=np.uint8))
    if pos != len(body):
        raise CorruptCheckpoint(f"{where}: {len(body) - pos} trailing bytes in blob")
    return planes
