"""Training health: a non-finite or spiking loss, and low disk or memory."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field


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
