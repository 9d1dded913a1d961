"""The parent's eyes during a concurrency stress run: branch heads sampled every half
second, and the acknowledged versions checked (I1) every ten seconds, read-only."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from concurrency_checker import check_present

from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.store import RetryPolicy, StoreOptions

#: What the parent's read-only observers use (straight to SeaweedFS, no faults).
OBSERVER_STORE = StoreOptions(
    connect_timeout=5.0, read_timeout=30.0, retry=RetryPolicy(attempts=4, total_seconds=60)
)


class Observer:
    """Samples branch heads and parent links (I2, I3) and checks I1 during the run."""

    def __init__(self, repo_args: tuple[str, dict[str, Any]], workdir: Path) -> None:
        self.repo_args, self.workdir = repo_args, workdir
        self.lock = threading.Lock()
        self.samples: list[tuple[float, float, dict[str, str]]] = []  # (start, end, heads)
        self.parents: dict[str, str | None] = {}
        self.metas: dict[str, dict[str, Any]] = {}
        self.branch_of: dict[str, str] = {}
        self.first_seen: dict[str, float] = {}  # vid -> end of the first sample holding it
        self.periodic: list[dict[str, str]] = []
        self.periodic_runs = 0
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._check, daemon=True),
        ]

    def repo(self) -> Repo:
        uri, opts = self.repo_args
        return Repo(uri, opts, options=RepoOptions(store=OBSERVER_STORE))

    def record(self, index: Any, start: float, end: float) -> None:
        with self.lock:
            self.samples.append((start, end, dict(index.branches)))
            with open(self.workdir / "samples.ndjson", "a") as f:
                row = {
                    "start": start,
                    "end": end,
                    "heads": index.branches,
                    "vids": sorted(index.versions),
                }
                f.write(json.dumps(row) + "\n")
            for v in index.versions.values():
                self.parents[v.id] = v.parent
                self.metas[v.id] = dict(v.meta)
                self.branch_of[v.id] = v.branch
                self.first_seen.setdefault(v.id, end)

    def _sample(self) -> None:
        repo = self.repo()
        while not self.stop.wait(0.5):
            start = time.monotonic()
            try:
                index = repo.index()
            except Exception as e:  # reported; the checker keeps going
                self.errors[f"sample: {type(e).__name__}"] += 1
                continue
            self.record(index, start, time.monotonic())

    def _check(self) -> None:
        repo, rng = self.repo(), random.Random(0)
        while not self.stop.wait(10.0):
            try:
                self.periodic.extend(check_present(repo, self.workdir, rng))
                self.periodic_runs += 1
            except Exception as e:
                self.errors[f"periodic check: {type(e).__name__}"] += 1

    def __enter__(self) -> Observer:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
