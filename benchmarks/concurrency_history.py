"""What happened in a concurrency stress run: the worker logs parsed into commits, leases
and maintenance outcomes, and the signals the parent dealt."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Outcomes that are definite refusals: the version must never appear.
REFUSALS = {"CommitConflict", "LeaseHeld", "FencedOut"}
#: A gc that refuses to sweep once its own sweep record lapsed: not a violation of I5.
SAFE_ABORTS = {"SweepExpired"}


def violation(invariant: str, detail: str, key: str = "") -> dict[str, str]:
    """A violation as the report lists it (``key`` deduplicates; default: the detail)."""
    return {"invariant": invariant, "detail": detail, "key": key or detail}


def read_logs(workdir: Path) -> list[dict[str, Any]]:
    """Every complete event of every worker log (a line torn by SIGKILL is skipped)."""
    events: list[dict[str, Any]] = []
    for path in sorted(workdir.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


@dataclass
class Chaos:
    """The SIGSTOPs and SIGKILLs the parent dealt, with their monotonic times."""

    stops: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Commit:
    """One commit attempt, from its intent and outcome events."""

    writer: str
    seq: int
    branch: str
    token: str
    sha: str
    intent: float
    outcome: str = "unknown"  # ack | refused | store_error | error | unknown (killed)
    vid: str | None = None
    parent: str | None = None
    acked: float = 0.0
    error: str = ""


@dataclass
class Lease:
    """One writer lease held: acquired (monotonic), logged, released (its intent)."""

    token: str
    writer: str
    branch: str
    acquired: float
    logged: float
    read_start: float  # the versions it then saw (``snapshot``) were read after this
    snapshot: set[str] | None
    fence: Any
    released: float | None = None


@dataclass
class History:
    """What the worker logs say happened."""

    commits: dict[tuple[str, int], Commit] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    deleted_at: dict[str, float] = field(default_factory=dict)  # first retention intent
    ops: Counter[str] = field(default_factory=Counter)
    violations: list[dict[str, str]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    fence_api: bool = False

    @property
    def acked(self) -> dict[str, Commit]:
        return {c.vid: c for c in self.commits.values() if c.vid}

    @classmethod
    def parse(cls, events: list[dict[str, Any]]) -> History:
        h = cls()
        for e in events:
            op, phase = e["op"], e["phase"]
            if op == "worker":
                h.fence_api |= bool(e.get("fence_api"))
                if phase == "crash":
                    h.crashes.append(f"{e['w']} crashed: {e['error']}: {e['message']}")
            elif op == "commit":
                h._commit(e)
            elif op == "lease" and phase == "acquired":
                snap = None if e["snapshot"] is None else set(e["snapshot"])
                h.leases[e["token"]] = Lease(
                    e["token"],
                    e["w"],
                    e["branch"],
                    e["acquired"],
                    e["t"],
                    e["read_start"],
                    snap,
                    e["fence"],
                )
                h.ops["lease acquisitions"] += 1
                h.ops["lease waits (LeaseHeld or store error)"] += e["waits"]
            elif op == "lease" and phase == "release" and e["token"] in h.leases:
                h.leases[e["token"]].released = e["t"]
            elif op in ("gc", "repair", "delete"):
                h._maintenance(e)
            elif phase == "error":
                h.ops[f"{op} errors: {e['error']}"] += 1
        for c in h.commits.values():
            h.ops[f"commits {c.outcome}"] += 1
            if c.error:
                h.ops[f"commits {c.outcome}: {c.error.split(':')[0]}"] += 1
        return h

    def _commit(self, e: dict[str, Any]) -> None:
        key = (e["w"], e["seq"])
        if e["phase"] == "intent":
            self.commits[key] = Commit(e["w"], e["seq"], e["branch"], e["token"], e["sha"], e["t"])
        elif (c := self.commits.get(key)) is not None and e["phase"] == "ack":
            c.outcome, c.vid, c.parent, c.acked = "ack", e["vid"], e["parent"], e["t"]
        elif c is not None:
            c.error = f"{e['error']}: {e['message']}"
            c.outcome = (
                "refused"
                if e["error"] in REFUSALS
                else "store_error"
                if e["store_error"]
                else "error"
            )

    def _maintenance(self, e: dict[str, Any]) -> None:
        op, phase = e["op"], e["phase"]
        kind = {"gc": "gc runs", "repair": "repairs", "delete": "retention deletes"}[op]
        if phase == "intent":
            for vid in e.get("vids", ()):
                self.deleted_at.setdefault(vid, e["t"])
        elif phase == "ack":
            self.ops[f"{kind}: ok"] += 1
            self.ops["versions deleted by retention"] += len(e.get("vids", ()))
        elif op == "delete" and e["conflict"]:
            self.ops[f"{kind}: refused (CommitConflict)"] += 1
        elif e["store_error"] and e["error"] != "PreconditionFailed":
            self.ops[f"{kind}: store error (faults)"] += 1
        elif e["error"] in SAFE_ABORTS or e.get("refused"):
            self.ops[f"{kind}: stopped safely ({e['error']})"] += 1
        else:
            self.ops[f"{kind}: raised {e['error']}"] += 1
            if op != "delete":
                self.violations.append(
                    violation("I5", f"{op} by {e['w']} raised {e['error']}: {e['message'][:200]}")
                )
