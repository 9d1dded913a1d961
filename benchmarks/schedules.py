"""Seeded random schedules of concurrent actors, with the protocol's invariants checked
after every step (the explorer and the invariants: tests/explorer/).

    python benchmarks/schedules.py [--schedules 10000] [--seed 0] [--out FILE.md]
    python benchmarks/schedules.py --replay SEED      # one schedule, step by step

Seed ``S`` stands for one whole schedule: its scenario (commits, lease holders, gcs,
repairs, retention), backend (memory:// or file://), kills, freezes and every choice.
The report lists the schedules run, their steps, the store operations by kind, each
invariant broken with the seeds that broke it, and the shortest such schedule.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import platform
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).with_name("RESULTS-schedules.md")
SEEDS_SHOWN = 200


def driver() -> ModuleType:
    """The package tests/explorer/, imported by path (tests/ is not a package)."""
    where = ROOT / "tests" / "explorer"
    spec = importlib.util.spec_from_file_location(
        "explorer", where / "__init__.py", submodule_search_locations=[str(where)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["explorer"] = module  # its submodules and dataclasses resolve through it
    spec.loader.exec_module(module)
    return module


def _revision() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    import cloudckpt

    where = Path(cloudckpt.__file__).resolve().parent.parent
    if where != ROOT:
        return f"`{where}` (not this checkout)"
    rev = git("rev-parse", "--short", "HEAD") or "?"
    return rev + (" + uncommitted changes" if git("status", "--porcelain", "cloudckpt") else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="the first seed; then seed+1, ...")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--replay", type=int, default=None, help="print one seed's schedule")
    p.add_argument("--deep-every", type=int, default=1, help="load+verify every N steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the library's warnings are expected here
    s = driver()
    revision = _revision()  # now: the code was imported now
    if args.replay is not None:
        print(s.run_random(args.replay, deep_every=1).report(limit=10_000))
        return
    t0 = time.monotonic()
    runs: list[Any] = []
    broken: dict[str, list[Any]] = defaultdict(list)
    templates: Counter[str] = Counter()
    failing: Counter[str] = Counter()
    ops: Counter[str] = Counter()
    steps = 0
    for n, seed in enumerate(range(args.seed, args.seed + args.schedules), 1):
        result = s.run_random(seed, deep_every=args.deep_every)
        template = result.scenario.split("(", 1)[0]
        templates[template] += 1
        steps += len(result.steps)
        ops.update(result.ops)
        for invariant in sorted({v.invariant for v in result.violations}):
            broken[invariant].append(result)
        failing[template] += bool(result.violations)
        runs.append((seed, len(result.steps), bool(result.violations)))
        if n % 500 == 0 or n == args.schedules:
            print(
                f"{n} schedules, {steps} steps, {sum(failing.values())} failing, "
                f"{time.monotonic() - t0:.0f}s",
                flush=True,
            )
    seconds = time.monotonic() - t0
    feats = s.features()
    how = "carry `fence=`" if feats.fencing else "call `lease.check()` before each commit"
    lines = [
        "# Schedule explorer: random interleavings of concurrent actors",
        "",
        f"`python benchmarks/schedules.py --schedules {args.schedules} --seed {args.seed} "
        f"--deep-every {args.deep_every}` on "
        f"{platform.node()} ({platform.machine()}, {time.strftime('%Y-%m-%d')}), cloudckpt "
        f"at {revision}; fencing API {'present' if feats.fencing else 'absent'} (lease "
        f"actors {how}).",
        "",
        "Every public `Store` method of each actor's handle is one step; after each step the "
        "invariants are checked through an unwrapped handle (I1 no acknowledged loss, I2 heads "
        "move forward, I3 fencing, I4 repair only restores, I5 gc returns; `hang`: a bound "
        "exceeded; `error`: any other unexpected exception). `--replay SEED` prints a "
        "schedule step by step.",
        "",
        "| schedules | steps | failing schedules | wall time | schedules/s |",
        "|---|---|---|---|---|",
        f"| {args.schedules} | {steps} | {sum(failing.values())} | {seconds:.0f} s | "
        f"{args.schedules / seconds:.1f} |",
        "",
        "## Violations",
        "",
    ]
    if not broken:
        lines.append("None.")
    else:
        lines += [
            "| invariant | schedules | first seed | shortest failing seed (steps) |",
            "|---|---|---|---|",
        ]
        for inv, results in sorted(broken.items()):
            short = min(results, key=lambda r: len(r.steps))
            lines.append(
                f"| {inv} | {len(results)} | {results[0].seed} | {short.seed} "
                f"({len(short.steps)}) |"
            )
        for inv, results in sorted(broken.items()):
            short = min(results, key=lambda r: len(r.steps))
            seeds = [str(r.seed) for r in results]
            more = len(seeds) - SEEDS_SHOWN
            lines += [
                "",
                f"### {inv}",
                "",
                f"Seeds ({len(seeds)}): {', '.join(seeds[:SEEDS_SHOWN])}"
                + (f", ... and {more} more" if more > 0 else ""),
                "",
                f"Shortest: seed {short.seed}, `{short.scenario}` on {short.backend}:",
                "",
                "```text",
                short.report(limit=80),
                "```",
            ]
    lines += ["", "## Scenarios", "", "| template | schedules | failing |", "|---|---|---|"]
    lines += [f"| {t} | {n} | {failing[t]} |" for t, n in sorted(templates.items())]
    lines += ["", "## Store operations by kind", "", "| operation | calls |", "|---|---|"]
    lines += [f"| {op} | {n} |" for op, n in ops.most_common()]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
