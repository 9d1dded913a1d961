"""Chaos run: saves and loads through a fault-injecting proxy in front of SeaweedFS.

    python benchmarks/chaos.py [--saves 20] [--rates 0.1,0.2,0.3] [--seed 2026]

For each fault rate, a seeded run commits ``--saves`` training states (an embedding model
with AdamW; its large tensors go up as multipart uploads) and loads each back under faults
(503 SlowDown, 500, dropped connections, stalls past the read timeout, truncated bodies),
then checks every visible version with the faults paused. Writes benchmarks/RESULTS-chaos.md.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path

from cloudckpt.testing import chaos
from cloudckpt.testing.faults import FaultPlan
from cloudckpt.testing.local_s3 import ACCESS_KEY, SECRET_KEY, SeaweedFS

OUT = Path(__file__).with_name("RESULTS-chaos.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=20)
    p.add_argument("--rates", default="0.1,0.2,0.3")
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args()
    logging.basicConfig()
    logging.getLogger().handlers[0].setLevel(logging.ERROR)  # retries are counted, not shown
    rows = []
    with SeaweedFS() as server:
        for rate in (float(r) for r in args.rates.split(",")):
            plan = FaultPlan(rate=rate, seed=args.seed, stall_seconds=1.5)
            report = chaos.run(
                server.endpoint,
                {"key": ACCESS_KEY, "secret": SECRET_KEY},
                server.fresh_uri("chaos"),
                plan,
                saves=args.saves,
                seconds=600,
            )
            print(f"rate {rate}: {report.summary()}", flush=True)
            rows.append((rate, report))
    lines = [
        "# Chaos run: saves and loads through injected S3 faults",
        "",
        f"`python benchmarks/chaos.py --saves {args.saves} --rates {args.rates} "
        f"--seed {args.seed}` on {platform.node()} ({platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}); SeaweedFS behind `cloudckpt.testing.faults`, store "
        "timeouts 1 s, retry budget 12 attempts / 60 s.",
        "",
        "| fault rate | requests | faults injected (by kind) | retries | saves | committed "
        "| save failures | loads | load failures | mismatches | torn versions | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate, r in rows:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.faults.items()))
        lines.append(
            f"| {rate:.0%} | {r.requests} | {sum(r.faults.values())} ({r.fault_rate:.1%}: "
            f"{kinds}) | {r.retries} | {r.saves} | {r.committed} | {len(r.save_failures)} | "
            f"{r.loads} | {len(r.load_failures)} | {len(r.mismatches)} | {len(r.torn)} | "
            f"{r.seconds:.1f} |"
        )
    failures = [f for _, r in rows for f in r.save_failures + r.load_failures]
    lines += [
        "",
        "Every load is compared bit for bit with the state committed; after the faulted "
        "phase every visible version is loaded (or verified, for a save that raised after "
        "its swap took effect) with the faults paused. Retries are those of cloudckpt's "
        "policy (logged); faults that the HTTP stack absorbs itself (a reused connection "
        "found closed) are not among them.",
        "",
        "Failures: " + ("; ".join(failures) if failures else "none."),
        "",
    ]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
