"""Options and statistics of the transfer pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cloudckpt import codec

MiB = 1 << 20


def _default_workers() -> int:
    return max(4, min(32, 4 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class TransferOptions:
    """How arrays are cut, compressed and moved.

    Arrays of ``chunk_size`` bytes or more are cut into chunks of that size; arrays
    smaller than ``pack_below`` share blobs (packs) of up to ``chunk_size`` bytes.

    ``max_inflight_bytes`` bounds the memory the pipeline holds. A chunk in flight is
    charged twice its raw size (scratch and output while compressing; the blob and the
    HTTP client's copy while uploading), so the default lets eight 16 MiB chunks move at
    once (the measurements behind these defaults are in the design notes). Raise it on
    machines with memory to spare and fast networks.
    """

    chunk_size: int = 16 * MiB
    pack_below: int = 1 * MiB
    max_inflight_bytes: int = 256 * MiB
    workers: int = field(default_factory=_default_workers)
    compression_level: int = 1
    progress: bool = False
    compress: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.max_inflight_bytes < 1 or self.workers < 1:
            raise ValueError("chunk_size, max_inflight_bytes and workers must be positive")


@dataclass
class TransferStats:
    """What one save or load moved."""

    logical_bytes: int = 0
    stored_bytes: int = 0
    transferred_bytes: int = 0
    transferred_blobs: int = 0
    reused_blobs: int = 0
    seconds: float = 0.0

    def add_blob(self, stored: int, transferred: bool) -> None:
        """Count a saved blob of ``stored`` bytes: transferred, or already in the store."""
        self.stored_bytes += stored
        if transferred:
            self.transferred_blobs += 1
            self.transferred_bytes += stored
        else:
            self.reused_blobs += 1


def codec_for(
    options: TransferOptions, dtype: str, itemsize: int, nbytes: int
) -> codec.CodecChoice:
    """The codec a blob of ``nbytes`` of ``dtype`` elements is stored with."""
    if not options.compress:
        return codec.CodecChoice(codec.RAW, 1)
    return codec.choose(dtype, itemsize, nbytes)
