"""A seeded chaos run: train, commit and load through a fault-injecting proxy.

Every save must either commit or raise a clear :class:`~cloudckpt.errors.CloudCkptError`;
every committed version must load bit-exact (under faults, and again once they stop); no
version may ever be visible that does not load. Used by the tests and by
``benchmarks/chaos.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cloudckpt.errors import CloudCkptError
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.store import StoreOptions
from cloudckpt.store.retry import RetryPolicy
from cloudckpt.testing.faults import KINDS, FaultPlan, FaultProxy
from cloudckpt.tree import map_arrays

#: Short timeouts and a patient retry budget: a stalled response costs one read timeout.
CHAOS_STORE = StoreOptions(
    connect_timeout=1.0,
    read_timeout=1.0,
    part_size=5 * 1024 * 1024,
    retry=RetryPolicy(attempts=12, total_seconds=60, initial_backoff=0.01, max_backoff=0.3),
)


@dataclass
class ChaosReport:
    requests: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    saves: int = 0
    committed: int = 0
    save_failures: list[str] = field(default_factory=list)
    loads: int = 0
    load_failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fault_rate(self) -> float:
        return sum(self.faults.values()) / max(self.requests, 1)

    def summary(self) -> str:
        return (
            f"requests={self.requests} faults={sum(self.faults.values())} "
            f"({self.fault_rate:.1%}: {dict(sorted(self.faults.items()))}) "
            f"retries={self.retries} saves={self.saves} committed={self.committed} "
            f"save_failures={len(self.save_failures)} loads={self.loads} "
            f"load_failures={len(self.load_failures)} mismatches={len(self.mismatches)} "
            f"torn={len(self.torn)} seconds={self.seconds:.1f}"
        )


class _RetryCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.count += 1


def _model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    # The embedding (~16 MB) and its AdamW moments go up as multipart uploads.
    model = nn.Sequential(nn.Embedding(32768, 128), nn.Linear(128, 256), nn.Linear(256, 8))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 32768, (64,), generator=g)
    loss = model(tokens).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    """A copy of the state that later training steps cannot change."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
    return map_arrays(state, lambda value, _: value.clone())


def run(
    upstream: str,
    credentials: dict[str, Any],
    uri: str,
    plan: FaultPlan,
    saves: int = 8,
    seconds: float = 120.0,
) -> ChaosReport:
    """Commit up to ``saves`` training states (stopping after ``seconds``) through a
    :class:`FaultProxy` to ``upstream``, loading each back under faults; then check every
    committed version with the faults paused."""
    report = ChaosReport()
    counter = _RetryCounter()
    store_log = logging.getLogger("cloudckpt.store")
    store_log.addHandler(counter)
    level = store_log.level
    store_log.setLevel(min(store_log.getEffectiveLevel(), logging.WARNING))
    start = time.monotonic()
    committed: dict[str, dict[str, Any]] = {}
    try:
        with FaultProxy(upstream, plan) as proxy:
            repo = Repo(
                uri, proxy.storage_options(credentials), options=RepoOptions(store=CHAOS_STORE)
            )
            model, opt = _model(plan.seed)
            for step in range(saves):
                if time.monotonic() - start > seconds:
                    break
                _train_step(model, opt, step)
                state = _snapshot(model, opt, step)
                report.saves += 1
                try:
                    version = repo.commit(state, step=step, fast_forward=True)
                except CloudCkptError as e:
                    report.save_failures.append(f"step {step}: {type(e).__name__}: {e}")
                    continue
                report.committed += 1
                committed[version.id] = state
                _load(repo, version.id, state, report)
            with proxy.paused():
                _check_all(repo, committed, report)
            report.requests = proxy.counts["requests"]
            report.faults = {k: n for k, n in proxy.counts.items() if k in KINDS}
    finally:
        store_log.removeHandler(counter)
        store_log.setLevel(level)
    report.retries = counter.count
    report.seconds = time.monotonic() - start
    return report


def _load(repo: Repo, vid: str, expected: dict[str, Any], report: ChaosReport) -> None:
    report.loads += 1
    try:
        loaded = repo.load(vid)
    except CloudCkptError as e:
        report.load_failures.append(f"{vid}: {type(e).__name__}: {e}")
        return
    if not _same(expected, loaded):
        report.mismatches.append(vid)


def _check_all(repo: Repo, committed: dict[str, dict[str, Any]], report: ChaosReport) -> None:
    """With the faults paused: each committed version loads exactly, and any other visible
    version (a save that raised after its swap took effect) verifies whole."""
    visible = {v.id for v in repo.versions()}
    for vid in sorted(visible - set(committed)):
        if not repo.verify(vid).ok:
            report.torn.append(vid)
    missing = set(committed) - visible
    report.mismatches.extend(f"{vid} committed but not visible" for vid in sorted(missing))
    for vid in sorted(visible & set(committed)):
        _load(repo, vid, committed[vid], report)
