"""Seeded mutation fuzzer of stored objects: hostile bytes in a repository must end in a
clear error, in bounded time and memory, with nothing written outside its place.

    python benchmarks/fuzz.py --inputs 100000 --seed 1 --report benchmarks/RESULTS-fuzz.md
    python benchmarks/fuzz.py --replay 1:4242        # one input again, with tracebacks

A small real repository is built once (``benchmarks/fuzz_target.py``: a manager's three
versions of an MLP + AdamW on ``main`` with a tag and its writer lease, two versions from
a Hugging Face ``Trainer`` on ``hf``, a Lightning pointer beside it, on file://). Each
input ``SEED:N`` mutates ONE stored object of a worker's copy of it (versions.json, a
manifest, a blob, the lease, a published marker, the pointer: bit flips, truncation,
extension, JSON type swaps, huge numbers, nesting 5,000 and 100,000 deep, path-like
strings, duplicated and removed keys, wrong ids; ``benchmarks/fuzz_mutate.py``), runs the
operations that read that object -- ``Repo.log``, ``Repo.load``, ``Repo.verify``,
``Repo.export``, ``CheckpointManager.restore``, Lightning's
``CloudCheckpointIO.load_checkpoint`` and the Hugging Face ``CloudCheckpointCallback.resume``
-- and classifies each outcome:

* **loaded correctly**: the result equals, bit for bit, what the operation returns on the
  pristine repository for one of its versions (a rewritten index may name another
  existing version; a restore may fall back to an older one);
* **CorruptCheckpoint** (or a subclass; for ``verify``, a report listing problems);
* **CheckpointNotFound**, or nothing found (``restore`` starting a fresh run, the HF
  resume returning None): accepted only when the mutated object is ``versions.json`` or
  the pointer -- the objects that name what is asked for (a deleted or rewritten index
  may no longer name the branch); from any other object it counts as other;
* **LeaseHeld**: accepted only when the mutated object is the lease;
* **other**: any other exception (``InvalidKey``, ``StoreError``, ``OverflowError``...), a
  wrong result returned silently (including ``log`` returning a row with an ill-typed
  field, an id that is not a version id or a branch name that is not a plain name), a
  Lightning load from a repository other than its own, ``verify`` disagreeing with
  ``load`` of the same ref (passing a version that fails to load or loads wrong, or
  reporting one that loads correctly), or an operation past its time limit (hang).

Note: a manifest has no checksum, so an edit that leaves it well-formed (a digit of the
Python RNG state, an optimizer hyper-parameter, two swapped dimensions of a shape, a chunk
pointing at another existing blob of the same size) loads a different state; the fuzzer
counts that as a wrong result (other), like any silent difference from the pristine state.

Every operation's writes are found by snapshotting the sandbox around it: ``restore``
may write in the repository, ``export`` in its output directory, the HF resume in its
``output_dir``; any other file that appears or changes is a write outside the target.
Exit status: 0 when other and writes outside are both 0, 1 otherwise, 2 if the harness
failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CLASSES = ("ok", "corrupt", "notfound", "leaseheld", "other")
HEADERS = (
    "loaded correctly",
    "CorruptCheckpoint",
    "CheckpointNotFound (accepted)",
    "LeaseHeld (accepted)",
    "other",
)
OP_ORDER = ("log", "load", "verify", "export", "restore", "lightning", "hf")


# -- the pristine repository --------------------------------------------------------
def source_fingerprint() -> str:
    """The library's sources and the fuzzer's target: the pristine repository is rebuilt
    when they change."""
    h = hashlib.sha256()
    for p in [*sorted((HERE.parent / "cloudckpt").rglob("*.py")), HERE / "fuzz_target.py"]:
        h.update(str(p.relative_to(HERE.parent)).encode() + p.read_bytes())
    return h.hexdigest()[:16]


def pristine(workdir: Path, builder: Worker | None) -> Path:
    """The pristine repository for the library's current sources, built by ``builder`` (a
    worker, or a process of its own) if missing."""
    dest = workdir / f"pristine-{source_fingerprint()}"
    if (dest / "meta.json").exists():
        return dest
    for old in workdir.glob("pristine-*"):  # built from older sources
        shutil.rmtree(old, ignore_errors=True)
    own = builder is None
    w = builder or Worker(mp.get_context("spawn"), -1, workdir)
    status, detail = ("failed", "the build timed out")
    try:
        w.conn.send(("build", str(dest)))
        if w.conn.poll(600):
            status, detail = w.conn.recv()
    except (EOFError, OSError):
        status, detail = ("failed", f"the builder died (exit code {w.proc.exitcode})")
    finally:
        if own:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(("stop",))
            w.proc.join(10)
            w.kill()
    if status != "built":
        raise RuntimeError(f"building the pristine repository failed:\n{detail}")
    return dest


# -- the run -----------------------------------------------------------------------
@dataclass
class Stats:
    seed: int
    inputs: int = 0
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)
    ops: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    op_seconds: Counter[str] = field(default_factory=Counter)
    other: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    outside: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_kb: int = 0
    setup_rss_kb: int = 0
    rss_raisers: list[tuple[int, str, str]] = field(default_factory=list)
    crashes: int = 0
    source: str = ""
    library: str = ""  # the commit the workers imported
    seconds: float = 0.0
    total_seconds: float = 0.0

    def add(self, record: dict[str, Any]) -> None:
        self.inputs += 1
        n = record["n"]
        self.by_kind[(record["object"], record["mutation"])] += 1
        for r in record["ops"]:
            self.ops[r["op"]][r["cls"]] += 1
            self.op_seconds[r["op"]] += r["seconds"]
            if r["cls"] == "other":
                case = {
                    "replay": f"{self.seed}:{n}",
                    "object": record["object"],
                    "rel": record["rel"],
                    "mutation": record["mutation"],
                    "detail": record["detail"],
                    "op": r["op"],
                    "ref": r["ref"],
                    "why": r["why"],
                    "where": r["where"],
                    "message": r["message"],
                }
                if len(self.other) < 5000:
                    self.other.append(case)
                key = (r["op"], r["why"], r["where"])
                group = self.groups.setdefault(key, {"count": 0, "example": case})
                group["count"] += 1
            if r["outside"]:  # one entry per operation run that wrote outside
                mutation = f"{record['rel']}: {record['mutation']}: {record['detail']}"
                self.outside.append(
                    {
                        "replay": f"{self.seed}:{n}",
                        "op": r["op"],
                        "paths": r["outside"],
                        "mutation": mutation,
                    }
                )
        rss = record["rss_kb"]
        if rss > self.peak_rss_kb:
            if self.peak_rss_kb and rss - self.peak_rss_kb > 50_000:
                self.rss_raisers.append(
                    (
                        rss,
                        f"{self.seed}:{n}",
                        f"{record['rel']}: {record['mutation']}: {record['detail'][:80]}",
                    )
                )
            self.peak_rss_kb = rss

    @property
    def other_total(self) -> int:
        return sum(c["other"] for c in self.ops.values())


class Worker:
    """A worker process; ``source``: the pristine repository to set up from (None: not
    yet, it only imports)."""

    def __init__(self, ctx: Any, wid: int, workdir: Path, source: Path | None = None) -> None:
        from fuzz_worker import serve

        self.wid = wid
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, str(workdir), wid), daemon=True)
        self.proc.start()
        if source is not None:
            self.setup(source)
        self.ready = False
        self.current: int | None = None
        self.started = 0.0

    def setup(self, source: Path) -> None:
        self.conn.send(("setup", str(source)))

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


def run(args: argparse.Namespace) -> Stats:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ctx = mp.get_context("spawn")
    workers = [Worker(ctx, i, workdir) for i in range(args.workers)]
    try:
        source = pristine(workdir, workers[0])
    except BaseException:
        for w in workers:
            w.kill()
        raise
    for w in workers:
        w.setup(source)
    print(f"pristine repository: {source} ({time.monotonic() - t0:.1f}s)", file=sys.stderr)
    opts = {"hf_rate": args.hf_rate, "op_limit": args.op_limit}
    stats = Stats(args.seed, source=str(source), library=_commit())
    next_n, end, deadline = args.start, args.start + args.inputs, t0 + args.max_seconds
    start = last_print = time.monotonic()

    def replace(i: int) -> None:
        workers[i].kill()
        workers[i] = Worker(ctx, workers[i].wid, workdir, source)

    try:
        while True:
            now = time.monotonic()
            for i, w in enumerate(workers):
                if w.current is not None and now - w.started > args.input_limit:
                    stats.add(
                        _lost_input(w.current, "hang", f"input ran past {args.input_limit:.0f}s")
                    )
                    replace(i)
                elif w.current is not None and not w.proc.is_alive():
                    stats.crashes += 1
                    stats.add(_lost_input(w.current, "worker died", f"exit code {w.proc.exitcode}"))
                    replace(i)
                elif not w.ready and not w.proc.is_alive():
                    raise RuntimeError(
                        f"worker {w.wid} failed at its setup (exit {w.proc.exitcode})"
                    )
            more = next_n < end and now < deadline
            for w in workers:
                if more and w.ready and w.current is None:
                    w.current, w.started = next_n, time.monotonic()
                    w.conn.send(("input", args.seed, next_n, opts))
                    next_n += 1
                    more = next_n < end
            if not more and all(w.current is None for w in workers):
                break
            for conn in wait([w.conn for w in workers], timeout=1.0):
                i, w = next((i, w) for i, w in enumerate(workers) if w.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    time.sleep(0.1)  # it died: found above
                    continue
                if msg[0] == "ready":
                    w.ready = True
                    stats.setup_rss_kb = max(stats.setup_rss_kb, msg[1])
                    continue
                stats.add(msg[1])
                w.current = None
                if msg[1]["hang"]:  # it exits: it may hold a stuck thread
                    replace(i)
            if not args.quiet and time.monotonic() - last_print > 15:
                last_print = time.monotonic()
                rate = stats.inputs / (last_print - start)
                print(
                    f"{stats.inputs:,}/{args.inputs:,} inputs, {rate:.1f}/s, other "
                    f"{stats.other_total:,}, outside {len(stats.outside)}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        for w in workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(("stop",))
        for w in workers:
            w.proc.join(5)
            w.kill()
            shutil.rmtree(workdir / f"w{w.wid}", ignore_errors=True)
    stats.seconds = time.monotonic() - start
    stats.total_seconds = time.monotonic() - t0
    return stats


def _lost_input(n: int, why: str, detail: str) -> dict[str, Any]:
    return {
        "n": n,
        "object": "?",
        "rel": "?",
        "mutation": "?",
        "detail": detail,
        "ops": [
            {
                "op": "input",
                "ref": "",
                "cls": "other",
                "why": why,
                "where": "worker",
                "message": detail,
                "seconds": 0.0,
                "outside": [],
            }
        ],
        "rss_kb": 0,
        "seconds": 0.0,
        "hang": True,
    }


# -- replay ------------------------------------------------------------------------
def replay(args: argparse.Namespace) -> int:
    import fuzz_target
    from fuzz_worker import run_input, setup

    seed, n = (int(x) for x in args.replay.split(":"))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    source = pristine(workdir, None)
    fuzz_target.TRACEBACKS = True
    ctx, target = setup(workdir, source, "replay")
    record = run_input(ctx, target, seed, n, {"hf_rate": 1.0, "op_limit": args.op_limit})
    print(f"input {seed}:{n}: {record['rel']}\n  {record['mutation']}: {record['detail']}")
    for r in record["ops"]:
        print(f"  {r['op']}({r['ref']}): {r['cls']} {r['why']} {r['where']}")
        if r["message"]:
            print("    " + r["message"].replace("\n", "\n    "))
        for p in r["outside"]:
            print(f"    wrote outside: {p}")
    bad = any(r["cls"] == "other" or r["outside"] for r in record["ops"])
    return 1 if bad else 0


# -- the report --------------------------------------------------------------------
def markdown(stats: Stats, args: argparse.Namespace, command: str) -> str:
    s = stats
    rate = stats.inputs / s.seconds if s.seconds else 0.0
    outside = len(stats.outside)
    runs = sum(sum(c.values()) for c in stats.ops.values())
    verdict = "PASS" if stats.other_total == 0 and outside == 0 else "FAIL"
    lines = [
        "# Fuzzing stored objects: hostile bytes, every reader",
        "",
        f"`{command}` ({_when()}; {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.workers} worker processes; library at {stats.library}).",
        "",
        f"**{verdict}: other = {stats.other_total:,}, writes outside the target = {outside:,}** "
        f"(operation runs) over {stats.inputs:,} inputs ({runs:,} operation runs) in "
        f"{s.seconds:.0f} s ({rate:.1f} inputs/s; {s.total_seconds:.0f} s "
        f"with the build and worker start-up). Peak RSS of a worker: "
        f"{stats.peak_rss_kb / 1024:.0f} MiB (after its setup: {stats.setup_rss_kb / 1024:.0f} "
        "MiB; address space capped at setup + 6 GiB).",
        "",
        "How inputs are made, run and classified: the docstring of `benchmarks/fuzz.py`. Each "
        "input mutates one object; the operations that read that object run on it.",
        "",
        "## Outcomes per operation",
        "",
        "| operation | runs | " + " | ".join(HEADERS) + " | mean ms |",
        "|---|---:|" + "---:|" * len(HEADERS) + "---:|",
    ]
    for op in sorted(stats.ops, key=lambda o: OP_ORDER.index(o) if o in OP_ORDER else 99):
        c = stats.ops[op]
        runs = sum(c.values())
        ms = 1000 * stats.op_seconds[op] / runs if runs else 0
        lines.append(
            f"| {op} | {runs:,} | " + " | ".join(f"{c[k]:,}" for k in CLASSES) + f" | {ms:.1f} |"
        )
    lines += ["", "## Other, grouped by operation, what and where", ""]
    if stats.groups:
        lines += [
            "| operation | what | where (innermost cloudckpt frame) | count | replay | "
            "mutation of the example |",
            "|---|---|---|---:|---|---|",
        ]
        for (op, why, where), g in sorted(stats.groups.items(), key=lambda kv: -kv[1]["count"]):
            ex = g["example"]
            mutation = f"`{_rel(ex['rel'])}` {ex['mutation']}: {ex['detail'][:90]}"
            lines.append(
                f"| {op} | {why} | `{where}` | {g['count']:,} | `{ex['replay']}` | "
                f"{_cell(mutation)} |"
            )
    else:
        lines.append("None.")
    lines += ["", "## Writes outside the target", ""]
    if stats.outside:
        lines += [
            "| operation | paths written (under the sandbox) | replay | mutation |",
            "|---|---|---|---|",
        ]
        for w in stats.outside[:30]:
            paths = ", ".join(f"`{p}`" for p in w["paths"][:4])
            more = f" and {len(w['paths']) - 4} more" if len(w["paths"]) > 4 else ""
            lines.append(
                f"| {w['op']} | {paths}{more} | `{w['replay']}` | {_cell(w['mutation'][:120])} |"
            )
    else:
        lines.append(
            "None: after every operation, no file appeared or changed outside the repository "
            "(for `restore`) or the output directory the user chose (`export`, the HF "
            "`output_dir`); every other operation wrote nothing."
        )
    peak, setup = stats.peak_rss_kb / 1024, stats.setup_rss_kb / 1024
    lines += ["", "## Memory", "", f"Peak RSS {peak:.0f} MiB, setup {setup:.0f} MiB."]
    if stats.rss_raisers:
        lines.append("Inputs that raised the peak by more than 50 MB:")
        lines += [
            f"- `{r}` to {kb / 1024:.0f} MiB: {_cell(d)}" for kb, r, d in stats.rss_raisers[-10:]
        ]
    lines += ["", "## Inputs tried, by object and mutation", ""]
    objects = sorted({o for o, _ in stats.by_kind})
    mutations = sorted({m for _, m in stats.by_kind})
    lines += [
        "| mutation | " + " | ".join(objects) + " | total |",
        "|---|" + "---:|" * (len(objects) + 1),
    ]
    for m in mutations:
        row = [stats.by_kind[(o, m)] for o in objects]
        lines.append(f"| {m} | " + " | ".join(f"{x:,}" for x in row) + f" | {sum(row):,} |")
    totals = [sum(stats.by_kind[(o, m)] for m in mutations) for o in objects]
    lines.append("| **total** | " + " | ".join(f"{x:,}" for x in totals) + f" | {sum(totals):,} |")
    lines += [
        "",
        "## Reproduce",
        "",
        f"    {command}",
        f"    python benchmarks/fuzz.py --replay {args.seed}:N   # one input, with tracebacks",
        "",
        f"Every 'other' case is in `{args.dump}` with its replay id. A replay rebuilds the "
        "pristine repository when the library's sources changed since the run (version ids and "
        "timestamps then differ, so a byte-offset mutation may hit other bytes; structural "
        "mutations reproduce).",
        "",
    ]
    return "\n".join(lines)


def _rel(rel: str) -> str:
    return rel.removeprefix("ckpt/.cloudckpt/")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("\x00", "\\0")


def _when() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=HERE,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "cloudckpt"],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
            timeout=10,
        ).stdout.strip()
        return f"`{head}`" + (" with uncommitted changes in cloudckpt/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "an unknown commit"


def _public_args(argv: list[str]) -> list[str]:
    """The arguments that matter to reproduce a run (not where its scratch files went)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--workdir", "--dump", "--json"):
            skip = True
        elif not a.startswith(("--workdir=", "--dump=", "--json=", "--quiet")):
            out.append(a)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start", type=int, default=0, help="first input number")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--report", help="write the markdown report here")
    p.add_argument("--dump", help="JSON of every 'other' case (default: <workdir>/other.json)")
    p.add_argument("--json", help="a JSON summary (counts, groups) for tests")
    p.add_argument(
        "--workdir",
        default=os.path.join(
            "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(), "cloudckpt-fuzz"
        ),
    )
    p.add_argument("--op-limit", type=float, default=10.0, help="seconds per operation")
    p.add_argument(
        "--input-limit",
        type=float,
        default=120.0,
        help="seconds per input before its worker is killed",
    )
    p.add_argument(
        "--hf-rate",
        type=float,
        default=1.0,
        help="share of versions.json inputs that also run the HF resume",
    )
    p.add_argument("--max-seconds", type=float, default=float("inf"))
    p.add_argument("--replay", metavar="SEED:N")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    if args.replay:
        return replay(args)
    args.dump = args.dump or os.path.join(args.workdir, "other.json")
    command = "python benchmarks/fuzz.py " + " ".join(_public_args(sys.argv[1:]))
    try:
        stats = run(args)
    except RuntimeError as e:
        print(f"harness failed: {e}", file=sys.stderr)
        return 2
    Path(args.dump).parent.mkdir(parents=True, exist_ok=True)
    Path(args.dump).write_text(
        json.dumps(
            {
                "seed": args.seed,
                "inputs": stats.inputs,
                "pristine": stats.source,
                "other": stats.other,
                "outside": stats.outside,
            },
            indent=1,
        )
    )
    text = markdown(stats, args, command)
    if args.report:
        Path(args.report).write_text(text)
    if args.json:
        ranked = sorted(stats.groups.items(), key=lambda kv: -kv[1]["count"])
        groups = [
            {
                "op": op,
                "why": why,
                "where": where,
                "count": g["count"],
                "replay": g["example"]["replay"],
                "mutation": g["example"]["mutation"],
                "detail": g["example"]["detail"],
                "object": g["example"]["rel"],
            }
            for (op, why, where), g in ranked
        ]
        Path(args.json).write_text(
            json.dumps(
                {
                    "inputs": stats.inputs,
                    "other": stats.other_total,
                    "outside": stats.outside,
                    "ops": {k: dict(v) for k, v in stats.ops.items()},
                    "groups": groups,
                    "by_kind": {f"{o}/{m}": c for (o, m), c in stats.by_kind.items()},
                    "peak_rss_kb": stats.peak_rss_kb,
                    "seconds": stats.seconds,
                    "crashes": stats.crashes,
                },
                indent=1,
            )
        )
    if not args.quiet:
        print(text if not args.report else f"report: {args.report}", file=sys.stderr)
    return 0 if stats.other_total == 0 and not stats.outside else 1


if __name__ == "__main__":
    sys.exit(main())
