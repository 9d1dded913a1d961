"""The concurrency stress run's report as markdown."""

from __future__ import annotations

import os
import platform
import time
from collections import defaultdict
from typing import Any


def markdown(report: dict[str, Any], command: str) -> str:
    """The report as markdown (violations listed, up to 20 per invariant)."""
    lines = [
        "# Concurrency stress run: committers, gc, repair and retention on one repository",
        "",
        f"`{command}` on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}): {report['stress_seconds']} s under stress, "
        f"{report['wall_seconds']} s in all. SeaweedFS behind `cloudckpt.testing.faults` "
        f"({report['fault_plan']['rate']:.0%} of requests); fence API in the library: "
        f"{'yes' if report['fence_api'] else 'no'}.",
        "",
        "| operation | count |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in report["operations"].items()),
        f"| workers SIGKILLed (and restarted) | {report['kills']} |",
        f"| committers SIGSTOPped past their lease ttl | {report['stops']} |",
        "",
        "| injected faults | count |",
        "|---|---|",
        *(f"| {k} | {n} |" for k, n in report["faults"].items()),
        "",
        f"## Violations: {len(report['violations'])}",
        "",
    ]
    for inv, n in report["violations_by_invariant"].items():
        lines.append(f"- **{inv}**: {n}")
        shown = [v for v in report["violations"] if v["invariant"] == inv][:20]
        lines += [f"  - {v['detail']}" for v in shown]
        if n > len(shown):
            lines.append(f"  - ... {n - len(shown)} more in the JSON report")
    if report["harness_problems"]:
        lines += ["", "## Harness problems", "", *(f"- {p}" for p in report["harness_problems"])]
    kinds: dict[str, list[str]] = defaultdict(list)
    for note in report["notes"]:
        kinds[note["kind"]].append(note["detail"])
    lines += ["", "## Notes", ""]
    for kind, details in kinds.items():
        more = f", ... ({len(details)} in all)" if len(details) > 3 else ""
        lines.append(f"- {kind}: {', '.join(details[:3])}{more}")
    return "\n".join(lines) + "\n"
