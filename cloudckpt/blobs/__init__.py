"""Array bytes <-> content-addressed, compressed blobs: the transfer pipeline."""

from cloudckpt.blobs.chunks import ChunkRef, blob_key, iter_chunks
from cloudckpt.blobs.options import TransferOptions, TransferStats
from cloudckpt.blobs.reader import BlobReader
from cloudckpt.blobs.writer import BlobWriter

__all__ = [
    "BlobReader",
    "BlobWriter",
    "ChunkRef",
    "TransferOptions",
    "TransferStats",
    "blob_key",
    "iter_chunks",
]
