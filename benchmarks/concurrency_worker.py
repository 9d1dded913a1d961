"""One actor of the concurrency stress run (``benchmarks/concurrency.py``).

    python benchmarks/concurrency_worker.py CONFIG.json

Roles: ``committer`` (commits small torch states under the branch's writer lease),
``gc``, ``repair`` and ``retention``. Every operation is logged to the worker's own JSON
lines file twice: an intent before it (``"phase": "intent"``) and its outcome after
(``"ack"`` or ``"error"``), each with a ``time.monotonic()`` timestamp (one clock for
every process of the host). A worker killed mid-operation leaves only the intent.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from cloudckpt import errors
from cloudckpt.lease import WriterLease
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.store import RetryPolicy, StoreOptions

#: Raised to a writer whose lease was taken over (added with fencing); else LeaseHeld.
FENCED: type[Exception] = getattr(errors, "FencedOut", errors.LeaseHeld)
#: Whether ``Repo.commit`` takes ``fence=`` (the fenced commit protocol).
HAS_FENCE = "fence" in inspect.signature(Repo.commit).parameters
#: Shared by every writer and branch: its blobs are deduplicated across all of them.
SHARED = torch.arange(4096, dtype=torch.float32)


def state_digest(state: Any) -> str:
    """sha256 over the tensors of a state: path, dtype, shape and bytes, in path order."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            found.append((path, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}/{i}")

    walk(state, "")
    h = hashlib.sha256()
    for path, t in sorted(found, key=lambda pt: pt[0]):
        h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Warnings(logging.Handler):
    """Keeps the library's own warnings (not the store's retries) for the next event."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.pending: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == "cloudckpt" and len(self.pending) < 5:
            self.pending.append(record.getMessage()[:300])

    def take(self) -> list[str]:
        out, self.pending = self.pending, []
        return out


class Worker:
    """The log, the clock and the repository handle every role shares."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.name: str = cfg["name"]
        self.rng = random.Random(f"{cfg['seed']}/{self.name}")
        s = cfg["store"]
        store = StoreOptions(
            connect_timeout=s["connect_timeout"],
            read_timeout=s["read_timeout"],
            retry=RetryPolicy(
                attempts=s["attempts"],
                total_seconds=s["total_seconds"],
                initial_backoff=0.02,
                max_backoff=0.5,
            ),
        )
        self.repo = Repo(cfg["uri"], cfg["storage_options"], options=RepoOptions(store=store))
        self.stop_file = Path(cfg["stop_file"])
        self.deadline = 0.0
        self.log: TextIO = open(cfg["log"], "a", buffering=1)  # noqa: SIM115 (closed by run)
        self.warnings = Warnings()
        logging.getLogger("cloudckpt").addHandler(self.warnings)

    def emit(self, op: str, phase: str, **fields: Any) -> None:
        """Append one event; line-buffered, so a SIGKILL loses at most this line."""
        row = {
            "t": time.monotonic(),
            "w": self.name,
            "pid": os.getpid(),
            "op": op,
            "phase": phase,
            **fields,
        }
        if phase != "intent" and (warnings := self.warnings.take()):
            row["warnings"] = warnings
        self.log.write(json.dumps(row) + "\n")

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.stop_file.exists()

    def nap(self, low: float, high: float) -> None:
        """Sleep a random while, waking early at the deadline."""
        end = min(time.monotonic() + self.rng.uniform(low, high), self.deadline)
        while time.monotonic() < end and not self.stop_file.exists():
            time.sleep(min(0.1, max(end - time.monotonic(), 0.0)))

    def wait_for_go(self) -> bool:
        """Wait (bounded) for the parent's go file, which holds the run's deadline."""
        go = Path(self.cfg["go_file"])
        end = time.monotonic() + self.cfg["start_timeout"]
        while time.monotonic() < end and not self.stop_file.exists():
            try:
                self.deadline = float(json.loads(go.read_text())["deadline"])
                return True
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        return False

    def fail(self, op: str, e: BaseException, **fields: Any) -> None:
        self.emit(
            op,
            "error",
            error=type(e).__name__,
            message=str(e)[:400],
            store_error=isinstance(e, errors.StoreError),
            **fields,
        )


# -- committer --------------------------------------------------------------------------
class Committer:
    """Commits real training states in batches, each under a freshly acquired lease."""

    def __init__(self, w: Worker) -> None:
        self.w = w
        self.branch: str = w.cfg["branch"]
        seed = int(hashlib.sha256(w.name.encode()).hexdigest()[:8], 16)
        torch.manual_seed(seed)
        self.model = nn.Linear(16, 8)
        self.model.bias.requires_grad_(False)  # never changes: its blob is reused
        self.opt = torch.optim.AdamW([self.model.weight], lr=1e-2)
        self.frozen = torch.randn(1024, generator=torch.Generator().manual_seed(seed))
        self.seq = 0

    def state(self) -> dict[str, Any]:
        x = torch.randn(32, 16)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.seq,
            "shared": SHARED,
            "frozen": self.frozen,
        }

    def acquire(self) -> WriterLease | None:
        """The branch's lease, retried on LeaseHeld and store errors until the deadline."""
        waits = 0
        while self.w.running():
            lease = WriterLease(self.w.repo.store, self.branch, ttl=self.w.cfg["ttl"])
            try:
                lease.acquire()
            except (errors.LeaseHeld, errors.StoreError) as e:
                waits += 1
                if isinstance(e, errors.StoreError):
                    self.w.fail("lease", e, token=lease.me.token)
                self.w.nap(0.1, 0.4)
                continue
            acquired = time.monotonic()
            fence = getattr(lease, "fence", None)
            snapshot: list[str] | None = None
            read_start = time.monotonic()
            # Which versions exist now: those missing here were published after this.
            with contextlib.suppress(errors.CloudCkptError):
                snapshot = sorted(self.w.repo.index().versions)
            self.w.emit(
                "lease",
                "acquired",
                branch=self.branch,
                token=lease.me.token,
                fence=_jsonable(fence),
                acquired=acquired,
                read_start=read_start,
                snapshot=snapshot,
                waits=waits,
            )
            return lease
        return None

    def run(self) -> None:
        per_lease = self.w.cfg["commits_per_lease"]
        while self.w.running():
            lease = self.acquire()
            if lease is None:
                break
            fence = getattr(lease, "fence", None)
            try:
                for _ in range(self.w.rng.randint(*per_lease)):
                    if not self.w.running() or not self.commit(lease, fence):
                        break
                    self.w.nap(0.0, 0.2)
            finally:
                self.w.emit("lease", "release", branch=self.branch, token=lease.me.token)
                try:
                    lease.release()
                except Exception as e:  # a failed release only delays the next holder
                    self.w.fail("release", e, token=lease.me.token)
            self.w.nap(0.05, 0.5)

    def commit(self, lease: WriterLease, fence: Any) -> bool:
        """One commit, logged; False once the lease is known lost (fenced out)."""
        self.seq += 1
        state = self.state()
        digest = state_digest(state)
        meta = {
            "writer": self.w.name,
            "seq": self.seq,
            "fence": _jsonable(fence),
            "lease": lease.me.token,
        }
        extra = {"fence": fence} if HAS_FENCE and fence is not None else {}
        self.w.emit(
            "commit",
            "intent",
            branch=self.branch,
            seq=self.seq,
            sha=digest,
            token=lease.me.token,
            fence=meta["fence"],
        )
        try:
            v = self.w.repo.commit(state, branch=self.branch, step=self.seq, meta=meta, **extra)
        except Exception as e:
            self.w.fail("commit", e, branch=self.branch, seq=self.seq, token=lease.me.token)
            return not isinstance(e, FENCED)
        self.w.emit(
            "commit",
            "ack",
            branch=self.branch,
            seq=self.seq,
            sha=digest,
            vid=v.id,
            parent=v.parent,
            token=lease.me.token,
            fence=meta["fence"],
        )
        return True


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, (int, float, str)) else repr(value)


# -- maintenance ------------------------------------------------------------------------
def gc_loop(w: Worker) -> None:
    """``repo.gc`` with the smallest grace the library accepts, again and again."""
    grace = 0.0
    while w.running():
        w.emit("gc", "intent", grace=grace)
        try:
            report = w.repo.gc(grace=grace)
        except ValueError as e:  # a minimum grace is enforced: find it by doubling
            w.fail("gc", e, grace=grace, refused=True)
            grace = max(1.0, 2 * grace)
            continue
        except Exception as e:
            w.fail("gc", e, grace=grace)
        else:
            w.emit(
                "gc",
                "ack",
                grace=grace,
                manifests=len(getattr(report, "manifests", ())),
                blobs=len(getattr(report, "blobs", ())),
            )
        w.nap(*w.cfg["pause"])


def repair_loop(w: Worker) -> None:
    """``repo.repair()`` every few seconds."""
    while w.running():
        w.nap(*w.cfg["pause"])
        if not w.running():
            break
        w.emit("repair", "intent")
        try:
            index = w.repo.repair()
        except Exception as e:
            w.fail("repair", e)
        else:
            w.emit("repair", "ack", versions=len(index.versions), heads=dict(index.branches))


def retention_loop(w: Worker) -> None:
    """Delete all but the newest ``keep`` versions of each branch (heads and tags stay)."""
    keep = w.cfg["keep"]
    while w.running():
        w.nap(*w.cfg["pause"])
        if not w.running():
            break
        try:
            index = w.repo.index()
        except Exception as e:
            w.fail("index", e)
            continue
        pinned = {*index.branches.values(), *index.tags.values()}
        doomed: list[str] = []
        for branch in index.branches:
            rows = sorted(
                (v for v in index.versions.values() if v.branch == branch),
                key=lambda v: (v.created, v.id),
                reverse=True,
            )
            doomed += [v.id for v in rows[keep:] if v.id not in pinned]
        if not doomed:
            continue
        w.emit("delete", "intent", vids=doomed)
        try:
            w.repo.delete(doomed)
        except Exception as e:
            w.fail("delete", e, vids=doomed, conflict=isinstance(e, errors.CommitConflict))
        else:
            w.emit("delete", "ack", vids=doomed)


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger().handlers[0].setLevel(logging.ERROR)  # warnings go to the event log
    logging.getLogger("cloudckpt").setLevel(logging.WARNING)
    w = Worker(cfg)
    try:
        w.emit("worker", "ready", role=cfg["role"], branch=cfg.get("branch"), fence_api=HAS_FENCE)
        if w.wait_for_go():
            role = cfg["role"]
            if role == "committer":
                Committer(w).run()
            else:
                {"gc": gc_loop, "repair": repair_loop, "retention": retention_loop}[role](w)
        w.emit("worker", "exit")
    except BaseException as e:
        w.emit(
            "worker",
            "crash",
            error=type(e).__name__,
            message=str(e)[:400],
            trace=traceback.format_exc()[-2000:],
        )
        raise
    finally:
        w.log.close()


if __name__ == "__main__":
    main()
