"""cloudckpt: durable, compressed, content-addressed PyTorch checkpoints in any object store."""

from cloudckpt.blobs import TransferOptions, TransferStats
from cloudckpt.errors import (
    CheckpointNotFound,
    CloudCkptError,
    CommitConflict,
    CorruptCheckpoint,
    StoreError,
    UnsupportedState,
)
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.store import RetryPolicy, StoreOptions
from cloudckpt.versions import Version

__version__ = "0.1.0"

__all__ = [
    "CheckpointNotFound",
    "CloudCkptError",
    "CommitConflict",
    "CorruptCheckpoint",
    "Repo",
    "RepoOptions",
    "RetryPolicy",
    "StoreError",
    "StoreOptions",
    "TransferOptions",
    "TransferStats",
    "UnsupportedState",
    "Version",
]
