"""The float planes of the ``fplanes`` codec (fp32, bf16): made, joined and compressed.

The exponent of a trained weight spans a narrow range, so ``split`` gives it a byte plane
of its own (the sign moves down next to the top 7 mantissa bits, the second plane);
``join`` puts them back. The codec (``cloudckpt.codec``) frames these planes and the
remaining mantissa byte planes.

``Literals`` compresses them: plain zstd frames, made through libzstd's experimental
parameters with literal (Huffman) compression forced on and a matcher that hardly
searches, so that zstd spends its time on the byte statistics where the gain is. Any
zstd decoder reads them; measurements in docs/design-notes.md, "Codec".
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

import zstandard

try:
    from cloudckpt import _planes  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: numpy makes the same bytes
    _planes = None

if TYPE_CHECKING:  # imported where bytes are coded, not at import
    import numpy as np

#: Whether the compiled split and join are in use (else numpy's, about 4-7x slower).
COMPILED = _planes is not None
#: Elements joined between two updates of the hash: 256 KiB of fp32 stay in the cache
#: until hashed (a pass over memory less than hashing the whole chunk afterwards).
_HASH_BLOCK = 1 << 16


class Hasher(Protocol):
    def update(self, data: Any, /) -> None: ...


#: zstd settings for the exponent plane: a tiny hash table finds almost no (spurious)
#: matches on near-random symbols, so zstd spends its bits on Huffman-coded literals.
#: (Measured against level 1: docs/design-notes.md, Codec.)
EXPONENT_PARAMS = dict(
    window_log=17, hash_log=6, chain_log=6, search_log=1, min_match=7, target_length=0
)
#: What ``Literals`` changes, where libzstd's experimental parameters can be reached: a
#: fast-strategy step of 257 bytes after a miss (target_length + 1: a match is still
#: found and extended, runs of zeros are still found), and Huffman-coded literals forced
#: on (libzstd turns them off by itself for a fast strategy with a target length).
LITERALS_TARGET_LENGTH = 256


def exponent_params() -> zstandard.ZstdCompressionParameters:
    return zstandard.ZstdCompressionParameters(strategy=zstandard.STRATEGY_FAST, **EXPONENT_PARAMS)


class Literals:
    """A zstd compressor for float planes, one per thread (a ``ZSTD_CCtx`` is not shared).

    Its frames are plain zstd frames: libzstd's fast strategy with the exponent
    parameters, a step of 257 bytes after a miss and literal (Huffman) compression forced
    on. Those two need libzstd's experimental parameters, which python-zstandard's cffi
    backend reaches (``zstandard.backend_cffi``: the same bundled libzstd). Where that
    backend cannot be imported, the C backend's compressor with the exponent parameters
    makes the same format, at about half the speed. Both release the GIL while they
    compress.
    """

    _local = threading.local()

    def __init__(self) -> None:
        self._lib = self._ffi = self._cctx = None
        self._fallback: zstandard.ZstdCompressor | None = None
        try:
            self._lib, self._ffi, self._cctx = literals_context()
        except (ImportError, AttributeError, RuntimeError):  # the same format, slower
            self._fallback = zstandard.ZstdCompressor(compression_params=exponent_params())

    @classmethod
    def get(cls) -> Literals:
        """This thread's compressor."""
        literals = getattr(cls._local, "literals", None)
        if literals is None:
            literals = cls._local.literals = cls()
        return literals

    @property
    def fast(self) -> bool:
        """Whether libzstd's experimental parameters are in use (not the fallback)."""
        return self._fallback is None

    def compress_into(self, src: np.ndarray, dst: np.ndarray) -> int:
        """Compress contiguous ``src`` into ``dst``; the frame's length, or 0 where it
        would not fit in ``dst`` (the caller stores ``src`` raw then)."""
        import numpy as np

        if self._fallback is not None:
            packed = self._fallback.compress(src)
            if len(packed) > dst.size:
                return 0
            dst[: len(packed)] = np.frombuffer(packed, dtype=np.uint8)
            return len(packed)
        lib, ffi = self._lib, self._ffi
        assert lib is not None and ffi is not None
        size = lib.ZSTD_compress2(
            self._cctx,
            ffi.from_buffer(dst, require_writable=True),
            dst.size,
            ffi.from_buffer(src),
            src.size,
        )
        if lib.ZSTD_isError(size):
            if lib.ZSTD_getErrorCode(size) == lib.ZSTD_error_dstSize_tooSmall:
                return 0
            raise RuntimeError(f"zstd: {ffi.string(lib.ZSTD_getErrorName(size)).decode()}")
        return int(size)


def literals_context() -> tuple[object, object, object]:
    """libzstd (python-zstandard's cffi backend), its ffi and a compression context set
    up for ``Literals``; ImportError or AttributeError where the backend or a parameter
    is missing, RuntimeError where libzstd refuses a setting."""
    from zstandard import backend_cffi

    lib, ffi = backend_cffi.lib, backend_cffi.ffi
    settings = [
        (lib.ZSTD_c_strategy, lib.ZSTD_fast),
        (lib.ZSTD_c_windowLog, EXPONENT_PARAMS["window_log"]),
        (lib.ZSTD_c_hashLog, EXPONENT_PARAMS["hash_log"]),
        (lib.ZSTD_c_chainLog, EXPONENT_PARAMS["chain_log"]),
        (lib.ZSTD_c_searchLog, EXPONENT_PARAMS["search_log"]),
        (lib.ZSTD_c_minMatch, EXPONENT_PARAMS["min_match"]),
        (lib.ZSTD_c_targetLength, LITERALS_TARGET_LENGTH),
        (lib.ZSTD_c_literalCompressionMode, lib.ZSTD_ps_enable),
        (lib.ZSTD_c_checksumFlag, 0),
        (lib.ZSTD_c_contentSizeFlag, 1),
    ]
    cctx = lib.ZSTD_createCCtx()
    if cctx == ffi.NULL:
        raise MemoryError("cannot allocate a zstd compression context")
    cctx = ffi.gc(cctx, lib.ZSTD_freeCCtx)
    for param, value in settings:
        if lib.ZSTD_isError(lib.ZSTD_CCtx_setParameter(cctx, param, value)):
            raise RuntimeError(f"libzstd refused compression parameter {param}={value}")
    return lib, ffi, cctx


def split(elems: np.ndarray) -> Iterator[np.ndarray]:
    """The planes of float elements ((n, width) uint8, little-endian), one at a time:
    the exponent plane, sign | 7 mantissa bits, then the other bytes, most significant
    first. The first two are fresh arrays; the others fresh or views of ``elems``."""
    import numpy as np

    width, m = elems.shape[1], elems.shape[0]
    if _planes is not None and width in (2, 4) and elems.flags.c_contiguous:
        planes = [np.empty(m, dtype=np.uint8) for _ in range(width)]
        (_planes.split_fp32 if width == 4 else _planes.split_bf16)(elems, *planes)
        while planes:  # handed over one by one: the caller frees each once written
            yield planes.pop(0)
        return
    yield from _split_numpy(elems)
    for k in range(width - 3, -1, -1):
        yield elems[:, k]


def _split_numpy(elems: np.ndarray) -> Iterator[np.ndarray]:
    """The exponent plane, then sign | 7 mantissa bits: fresh arrays made from the top two
    bytes of each element (sign | exponent 7..1, and exponent 0 | 7 mantissa bits)."""
    import numpy as np

    width = elems.shape[1]
    m = elems.shape[0]
    if width == 2:
        # bf16: the elements are contiguous uint16 words; shift-and-narrow passes over
        # them beat gathering their bytes.
        words = elems.view(np.uint16)[:, 0]
        exponent = np.empty(m, dtype=np.uint8)
        np.right_shift(words, 7, out=exponent, casting="unsafe")
        yield exponent
        del exponent
        sign_mant = np.empty(m, dtype=np.uint8)
        np.right_shift(words, 8, out=sign_mant, casting="unsafe")
        sign_mant &= 0x80
        low = np.empty(m, dtype=np.uint8)
        np.copyto(low, words, casting="unsafe")
        low &= 0x7F
        sign_mant |= low
        del low
        yield sign_mant
        return
    # fp32: two strided byte gathers, then contiguous uint8 operations (vectorised).
    top = elems[:, width - 1].copy()  # copies even where the view is contiguous (one
    nxt = elems[:, width - 2].copy()  # element): they are changed in place below
    exponent = np.right_shift(nxt, 7)  # exponent bit 0
    exponent += top  # + 2 * top (mod 256): the other seven bits above it, sign dropped
    exponent += top
    yield exponent
    del exponent
    top &= 0x80
    nxt &= 0x7F
    nxt |= top  # the sign next to the 7 mantissa bits
    del top
    yield nxt


def join(planes: list[np.ndarray], out: np.ndarray, hasher: Hasher | None = None) -> bool:
    """Write every element of ``out`` ((n, width) uint8, C order) from its planes, in
    :func:`split`'s order. With ``hasher``, the compiled join feeds it ``out``'s bytes
    block by block as they are written (while in the cache) and returns True; numpy's
    returns False (hash ``out`` afterwards)."""
    width, n = out.shape[1], out.shape[0]
    if _planes is not None and width in (2, 4) and out.flags.c_contiguous:
        fn = _planes.join_fp32 if width == 4 else _planes.join_bf16
        if hasher is None:
            fn(*planes, out)
            return False
        flat = out.reshape(-1)
        for a in range(0, n, _HASH_BLOCK):
            b = min(n, a + _HASH_BLOCK)
            fn(*(p[a:b] for p in planes), flat[a * width : b * width])
            hasher.update(flat[a * width : b * width])
        return True
    _join_numpy(planes[0], planes[1], out)
    for i, plane in enumerate(planes[2:]):
        out[:, width - 3 - i] = plane
    return False


def _join_numpy(exponent: np.ndarray, sign_mant: np.ndarray, out: np.ndarray) -> None:
    """Write the top two bytes of every element of ``out`` ((n, width) uint8, C order)
    from the exponent plane and the sign | 7 mantissa bits plane."""
    import numpy as np

    width = out.shape[1]
    if width == 2:
        # bf16: the elements are contiguous uint16 words, built in place.
        words = out.view(np.uint16)[:, 0]
        np.copyto(words, sign_mant)  # sign << 7 | 7 mantissa bits
        sign = words & 0x80
        words ^= sign  # the mantissa bits
        sign <<= 8
        words |= sign  # the sign in bit 15
        np.left_shift(exponent, 7, out=sign, dtype=np.uint16)
        words |= sign  # the exponent in bits 14..7
        return
    # Contiguous uint8 operations into two scratch planes, then one strided store each.
    word = np.right_shift(exponent, 1)
    bits = np.bitwise_and(sign_mant, 0x80)
    word |= bits
    out[:, width - 1] = word
    np.left_shift(exponent, 7, out=word)
    np.bitwise_and(sign_mant, 0x7F, out=bits)
    word |= bits
    out[:, width - 2] = word
