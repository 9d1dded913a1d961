"""The concurrency stress run (benchmarks/concurrency.py) for a minute: no violations.

Committers on two branches under writer leases (one SIGSTOPped past its lease, one
SIGKILLed and restarted), gc with grace 0, repair and retention, all through injected S3
faults; the history checker must find nothing, and every kind of operation and fault
must actually have happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def test_a_minute_of_concurrent_commits_gc_repair_and_retention_violates_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "concurrency.py"),
        "--seconds",
        "60",
        "--seed",
        "7",
        "--out",
        str(tmp_path / "RESULTS.md"),
        "--json",
        str(out),
        "--workdir",
        str(tmp_path / "work"),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=540,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["harness_problems"] == [], report["harness_problems"]
    ops, faults = report["operations"], report["faults"]
    happened = {
        "commits acked": ops.get("commits ack", 0),
        "gc runs": ops.get("gc runs: ok", 0),
        "repairs": ops.get("repairs: ok", 0),
        "retention deletions": ops.get("versions deleted by retention", 0),
        "lease takeovers": ops.get("lease takeovers (holder alive)", 0)
        + ops.get("lease takeovers (holder killed)", 0),
        "kills": report["kills"],
        "stops": report["stops"],
        **{f"{kind} faults": faults[kind] for kind in ("slowdown", "internal", "reset", "stall")},
    }
    assert all(n > 0 for n in happened.values()), happened
    details = "\n".join(v["detail"] for v in report["violations"][:30])
    assert report["violations"] == [], (
        f"{report['violations_by_invariant']} (workdir {tmp_path / 'work'}):\n{details}"
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_the_checker_flags_each_invariant(tmp_path: Path, monkeypatch: Any) -> None:
    """A made-up history breaking I1-I6 once each (I3 twice: fence order and takeover)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from concurrency_checker import analyze
    from concurrency_history import Chaos
    from concurrency_observer import Observer
    from concurrency_worker import state_digest

    sha = state_digest({})

    @dataclass
    class Row:
        id: str
        branch: str
        parent: str | None
        meta: dict[str, Any]

    class Index:
        def __init__(self, heads: dict[str, str], rows: list[Row]) -> None:
            self.branches, self.versions = heads, {r.id: r for r in rows}

    class FakeRepo:
        def verify(self, vid: str) -> Any:
            return SimpleNamespace(ok=vid != "a3", problems={} if vid != "a3" else {"x": "y"})

        def load(self, vid: str) -> Any:
            return {}

    def row(vid: str, parent: str | None, writer: str, seq: int, token: str) -> Row:
        return Row(vid, "main", parent, {"writer": writer, "seq": seq, "lease": token})

    def commit(
        w: str,
        seq: int,
        t: float,
        token: str,
        vid: str | None = None,
        parent: str | None = None,
        error: str = "",
    ) -> list[dict[str, Any]]:
        base = {"op": "commit", "w": w, "seq": seq, "branch": "main", "token": token}
        out = [{**base, "phase": "intent", "t": t, "sha": sha}]
        if vid:
            out.append({**base, "phase": "ack", "t": t + 0.5, "vid": vid, "parent": parent})
        if error:
            out.append(
                {
                    **base,
                    "phase": "error",
                    "t": t + 0.5,
                    "error": error,
                    "message": "",
                    "store_error": False,
                }
            )
        return out

    def lease(w: str, token: str, t: float, fence: int, snap: list[str]) -> dict[str, Any]:
        return {
            "op": "lease",
            "phase": "acquired",
            "w": w,
            "branch": "main",
            "token": token,
            "acquired": t,
            "t": t,
            "read_start": t,
            "snapshot": snap,
            "fence": fence,
            "waits": 0,
        }

    events = [
        {"op": "worker", "phase": "ready", "w": "A", "fence_api": True},
        lease("A", "ta", 1, 1, ["v0"]),
        *commit("A", 1, 2, "ta", "a1", "v0"),
        lease("B", "tb", 5, 2, ["v0", "a1"]),
        *commit("B", 1, 6, "tb", "b1", "a1"),
        *commit("A", 2, 7, "ta", "a2", "b1"),  # after the takeover, on top of fence 2
        *commit("A", 3, 9, "ta", error="FencedOut"),  # refused, yet "a3" shows up
        *commit("B", 2, 10, "tb", "b2", "a2"),  # acknowledged, then lost
        {
            "op": "gc",
            "phase": "error",
            "w": "gc",
            "t": 11,
            "error": "CorruptCheckpoint",
            "message": "",
            "store_error": False,
        },
    ]
    v0 = Row("v0", "main", None, {"writer": "setup", "seq": 0})
    a1, b1 = row("a1", "v0", "A", 1, "ta"), row("b1", "a1", "B", 1, "tb")
    a2, a3 = row("a2", "b1", "A", 2, "ta"), row("a3", "v0", "A", 3, "ta")
    obs = Observer(("memory://unused", {}), tmp_path)
    for t, head, rows in [
        (3, "a1", [v0, a1]),
        (6.6, "b1", [v0, a1, b1]),
        (8.6, "a2", [v0, a1, b1, a2]),
        (9.6, "a3", [v0, a1, b1, a2, a3]),
    ]:
        obs.record(Index({"main": head}, rows), t, t)
    final = Index({"main": "a3"}, [v0, a1, b1, a2, a3])
    report = analyze(events, obs, final, FakeRepo(), Chaos())  # type: ignore[arg-type]
    flagged = sorted(v["invariant"] for v in report["violations"])
    assert flagged == ["I1", "I2", "I3", "I3", "I4", "I5", "I6"], report["violations"]
