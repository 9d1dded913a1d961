"""Training health: a non-finite or spiking loss, low disk or memory, and whether the
state still is a completed step's (the save-on-exception guard)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import statistics
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cloudckpt import tree

log = logging.getLogger("cloudckpt")


@dataclass
class HealthCheck:
    """Watches ``metric`` every step. A non-finite value, or one above ``spike_factor``
    times the running median of the last ``window`` finite values (once ``warmup``
    values are in), is unhealthy: the manager then rolls back to the last committed
    version instead of saving. ``skip_batches`` keeps the data position moving forward
    so the offending batches are not replayed. After ``max_rollbacks`` rollbacks
    without a healthy save in between, the manager raises instead of looping."""

    metric: str = "loss"
    spike_factor: float = 3.0
    window: int = 50
    warmup: int = 10
    skip_batches: bool = True
    max_rollbacks: int = 3
    min_free_disk_gb: float = 1.0
    min_free_memory_gb: float = 1.0
    _history: deque[float] = field(default_factory=deque, repr=False)
    _rollbacks: int = field(default=0, repr=False)

    def problem(self, metrics: Mapping[str, float]) -> str | None:
        """Why this step is unhealthy, or None (healthy values join the history)."""
        value = metrics.get(self.metric)
        if value is None:
            return None
        if not math.isfinite(value):
            return f"{self.metric} is {value}"
        if len(self._history) >= self.warmup:
            median = statistics.median(self._history)
            if median > 0 and value > self.spike_factor * median:
                return (
                    f"{self.metric} spiked to {value:.6g}, over {self.spike_factor:g} x the "
                    f"running median {median:.6g}"
                )
        self._history.append(value)
        while len(self._history) > self.window:
            self._history.popleft()
        return None

    def rolling_back(self, problem: str) -> None:
        """Count a rollback for ``problem``; RuntimeError after ``max_rollbacks`` in a row."""
        self._rollbacks += 1
        if self._rollbacks > self.max_rollbacks:
            raise RuntimeError(
                f"{problem} after {self.max_rollbacks} rollbacks in a row; stopping "
                "(lower the learning rate or inspect the data)"
            )

    def rolled_back(
        self, problem: str, at_step: int, to_version: str, to_step: int
    ) -> dict[str, Any]:
        """Log a rollback; the event the next save records."""
        skipping = ", skipping the offending batches" if self.skip_batches else ""
        log.warning(
            "%s at step %d: rolled back to %s (step %d)%s",
            problem,
            at_step,
            to_version,
            to_step,
            skipping,
        )
        return {
            "action": "rollback",
            "reason": problem,
            "at_step": at_step,
            "to_version": to_version,
            "to_step": to_step,
            "skipped_batches": self.skip_batches,
        }

    def before_save(self, where: str, to_bucket: bool = True) -> dict[str, float]:
        """A save ends a run of rollbacks (not a local tier's save: rollbacks go back to
        the bucket's head, which it does not move): free disk and memory for its
        metadata, low ones logged as warnings about ``where``."""
        if to_bucket:
            self._rollbacks = 0
        report = self.resources()
        for warning in self.resource_warnings(report):
            log.warning("%s: %s", where, warning)
        return report

    def resources(self, path: str | None = None) -> dict[str, float]:
        """Free disk (where ``path`` lives, default the temp dir) and memory, in GB."""
        report = {"free_disk_gb": shutil.disk_usage(path or tempfile.gettempdir()).free / 1e9}
        available = _available_memory()
        if available is not None:
            report["free_memory_gb"] = available / 1e9
        return report

    def resource_warnings(self, report: Mapping[str, float]) -> list[str]:
        warnings = []
        if report.get("free_disk_gb", math.inf) < self.min_free_disk_gb:
            warnings.append(f"low free disk: {report['free_disk_gb']:.2f} GB")
        if report.get("free_memory_gb", math.inf) < self.min_free_memory_gb:
            warnings.append(f"low free memory: {report['free_memory_gb']:.2f} GB")
        return warnings


def _available_memory() -> int | None:
    """MemAvailable (free plus reclaimable cache) on Linux, else free pages, in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _write_count(t: torch.Tensor) -> int:
    """How many in-place writes ``t`` has seen.

    torch has no public way to ask whether a tensor was written to; its private version
    counter ``t._version`` is bumped by every in-place write (an optimizer step
    included) and shared with the detached views ``state_dict()`` returns. Everything
    that reads torch's private API is here, in this one function.
    """
    return t._version


class CompletedStep:
    """Whether the registered objects still hold exactly the state of the last completed
    step: a save on exception commits that state, never a half-updated one."""

    def __init__(self) -> None:
        #: The step marked completed last.
        self.step = 0
        self._counts: dict[str, tuple[int, int]] = {}

    def mark(self, step: int, objects: Mapping[str, Any]) -> None:
        """``step`` is completed: ``objects`` now hold its state."""
        self._counts = _write_counts(objects)
        self.step = step

    def unchanged(self, objects: Mapping[str, Any]) -> bool:
        """No tensor of ``objects`` was replaced or written to since the last ``mark``."""
        return _write_counts(objects) == self._counts

    def save_after(
        self,
        exc: BaseException,
        objects: Mapping[str, Any],
        step: int,
        committed: int | None,
        rank: int | None = None,
    ) -> bool:
        """Whether to save ``objects`` after ``exc`` ended the training loop at ``step``:
        only if they hold exactly a completed step's state, not committed yet, and this
        is the only process (``rank`` None) -- the other ranks of a job may never reach a
        collective save. Logs why not."""
        name = type(exc).__name__
        if rank is not None:
            log.error(
                "%s raised on rank %d; not saving (the other ranks may never reach a "
                "collective save). The last committed step is %s.",
                name,
                rank,
                committed,
            )
            return False
        if not self.unchanged(objects):
            log.error(
                "%s raised mid-step (the state changed after step %d completed); not saving a "
                "half-updated state. The last committed step is %s.",
                name,
                self.step,
                committed,
            )
            return False
        if committed == step:
            log.info("%s raised; step %d is already committed", name, step)
            return False
        return True


def _write_counts(objects: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    out = {}
    for name, obj in objects.items():
        for path, t in tree.tensors_by_path(obj.state_dict(), name).items():
            out[path] = (t.data_ptr(), _write_count(t))
    return out
