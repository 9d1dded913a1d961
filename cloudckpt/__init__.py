"""cloudckpt: durable, compressed, content-addressed PyTorch checkpoints in any object store.

The names below are the public API. They are imported on first use, so that
``import cloudckpt`` (and the metadata layer: ``cloudckpt.store``, ``cloudckpt.versions``)
does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_WHERE: dict[str, str] = {
    "BackgroundSaver": "cloudckpt.background",
    "BlobCache": "cloudckpt.blobs.cache",
    "CacheOptions": "cloudckpt.blobs.cache",
    "Change": "cloudckpt.diff",
    "CheckpointManager": "cloudckpt.manager",
    "CheckpointNotFound": "cloudckpt.errors",
    "CloudCkptError": "cloudckpt.errors",
    "CommitConflict": "cloudckpt.errors",
    "CorruptCheckpoint": "cloudckpt.errors",
    "Diff": "cloudckpt.diff",
    "DistributedOptions": "cloudckpt.distributed.replicated",
    "EveryMinutes": "cloudckpt.policies",
    "EveryNSteps": "cloudckpt.policies",
    "FencedOut": "cloudckpt.errors",
    "GCReport": "cloudckpt.gc",
    "Group": "cloudckpt.distributed.collectives",
    "HealthCheck": "cloudckpt.health",
    "Index": "cloudckpt.versions",
    "KeepBest": "cloudckpt.policies",
    "KeepEvery": "cloudckpt.policies",
    "KeepLast": "cloudckpt.policies",
    "LeaseHeld": "cloudckpt.errors",
    "LocalTier": "cloudckpt.tiers.local",
    "Manifest": "cloudckpt.manifest",
    "Notice": "cloudckpt.preemption",
    "ObjectInfo": "cloudckpt.store",
    "OnBestMetric": "cloudckpt.policies",
    "Policies": "cloudckpt.policies",
    "PreemptionWatcher": "cloudckpt.preemption",
    "RankFailure": "cloudckpt.errors",
    "RanksFailed": "cloudckpt.errors",
    "RanksUnreachable": "cloudckpt.errors",
    "Repo": "cloudckpt.repo",
    "RepoOptions": "cloudckpt.repo",
    "ResumableSampler": "cloudckpt.resume",
    "Resumed": "cloudckpt.results",
    "RetentionPolicy": "cloudckpt.policies",
    "RetryPolicy": "cloudckpt.store",
    "RunHistory": "cloudckpt.policies",
    "SaveFailures": "cloudckpt.policies",
    "SaveJob": "cloudckpt.background",
    "SavePoint": "cloudckpt.policies",
    "SavePolicy": "cloudckpt.policies",
    "SaveReport": "cloudckpt.results",
    "StepResult": "cloudckpt.results",
    "Store": "cloudckpt.store",
    "StoreError": "cloudckpt.errors",
    "StoreOptions": "cloudckpt.store",
    "Sweep": "cloudckpt.versions",
    "TransferOptions": "cloudckpt.blobs",
    "TransferStats": "cloudckpt.blobs",
    "UnsupportedState": "cloudckpt.errors",
    "VerifyReport": "cloudckpt.integrity",
    "Version": "cloudckpt.versions",
}

__all__ = [
    "BackgroundSaver",
    "BlobCache",
    "CacheOptions",
    "Change",
    "CheckpointManager",
    "CheckpointNotFound",
    "CloudCkptError",
    "CommitConflict",
    "CorruptCheckpoint",
    "Diff",
    "DistributedOptions",
    "EveryMinutes",
    "EveryNSteps",
    "FencedOut",
    "GCReport",
    "Group",
    "HealthCheck",
    "Index",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "LeaseHeld",
    "LocalTier",
    "Manifest",
    "Notice",
    "ObjectInfo",
    "OnBestMetric",
    "Policies",
    "PreemptionWatcher",
    "RankFailure",
    "RanksFailed",
    "RanksUnreachable",
    "Repo",
    "RepoOptions",
    "ResumableSampler",
    "Resumed",
    "RetentionPolicy",
    "RetryPolicy",
    "RunHistory",
    "SaveFailures",
    "SaveJob",
    "SavePoint",
    "SavePolicy",
    "SaveReport",
    "StepResult",
    "Store",
    "StoreError",
    "StoreOptions",
    "Sweep",
    "TransferOptions",
    "TransferStats",
    "UnsupportedState",
    "VerifyReport",
    "Version",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cloudckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


if TYPE_CHECKING:
    from cloudckpt.background import BackgroundSaver, SaveJob
    from cloudckpt.blobs import TransferOptions, TransferStats
    from cloudckpt.blobs.cache import BlobCache, CacheOptions
    from cloudckpt.diff import Change, Diff
    from cloudckpt.distributed.collectives import Group
    from cloudckpt.distributed.replicated import DistributedOptions
    from cloudckpt.errors import (
        CheckpointNotFound,
        CloudCkptError,
        CommitConflict,
        CorruptCheckpoint,
        FencedOut,
        LeaseHeld,
        RankFailure,
        RanksFailed,
        RanksUnreachable,
        StoreError,
        UnsupportedState,
    )
    from cloudckpt.gc import GCReport
    from cloudckpt.health import HealthCheck
    from cloudckpt.integrity import VerifyReport
    from cloudckpt.manager import CheckpointManager
    from cloudckpt.manifest import Manifest
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
    from cloudckpt.preemption import Notice, PreemptionWatcher
    from cloudckpt.repo import Repo, RepoOptions
    from cloudckpt.results import Resumed, SaveReport, StepResult
    from cloudckpt.resume import ResumableSampler
    from cloudckpt.store import ObjectInfo, RetryPolicy, Store, StoreOptions
    from cloudckpt.tiers.local import LocalTier
    from cloudckpt.versions import Index, Sweep, Version
