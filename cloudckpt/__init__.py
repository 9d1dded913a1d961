"""cloudckpt: durable, compressed, content-addressed PyTorch checkpoints in any object store."""

from cloudckpt.blobs import TransferOptions, TransferStats
from cloudckpt.errors import (
    CheckpointNotFound,
    CloudCkptError,
    CommitConflict,
    CorruptCheckpoint,
    FencedOut,
    LeaseHeld,
    StoreError,
    UnsupportedState,
)
from cloudckpt.health import HealthCheck
from cloudckpt.manager import CheckpointManager
from cloudckpt.policies import (
    EveryMinutes,
    EveryNSteps,
    KeepBest,
    KeepEvery,
    KeepLast,
    OnBestMetric,
    Policies,
    RetentionPolicy,
    RunHistory,
    SaveFailures,
    SavePoint,
    SavePolicy,
)
from cloudckpt.preemption import PreemptionWatcher
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.results import Resumed, SaveReport, StepResult
from cloudckpt.resume import ResumableSampler
from cloudckpt.store import RetryPolicy, StoreOptions
from cloudckpt.versions import Version

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "CheckpointNotFound",
    "CloudCkptError",
    "CommitConflict",
    "CorruptCheckpoint",
    "EveryMinutes",
    "EveryNSteps",
    "FencedOut",
    "HealthCheck",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "LeaseHeld",
    "OnBestMetric",
    "Policies",
    "PreemptionWatcher",
    "Repo",
    "RepoOptions",
    "ResumableSampler",
    "Resumed",
    "RetentionPolicy",
    "RetryPolicy",
    "RunHistory",
    "SaveFailures",
    "SavePoint",
    "SavePolicy",
    "SaveReport",
    "StepResult",
    "StoreError",
    "StoreOptions",
    "TransferOptions",
    "TransferStats",
    "UnsupportedState",
    "Version",
]
