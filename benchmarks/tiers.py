"""The local tier and the blob cache against the alternatives' bucket path, in one run.

    python benchmarks/tiers.py [--preset gpt2|small] [--repeats 3] [--local DIR] [--out DIR]

Starts a local SeaweedFS and builds the GPT-2-small + AdamW state (as compare.py does),
then measures, alternating run by run, the median of: the fastest alternatives' save and
restore through the bucket (s3torchconnector, torch.save + boto3) and cloudckpt's own;
one copy of the state into reused host buffers (the floor of any blocking save); a local
tier save, synchronous and async (blocking time), on ``--local`` (default ``/dev/shm``);
a restore on the same host from the local tier after a restart; a restore from the blob
cache after a restart; and a bucket save uploaded from the local tier. Writes
RESULTS-tiers.md (``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare

from cloudckpt import CacheOptions, CheckpointManager, LocalTier, Repo, RepoOptions
from cloudckpt.snapshot import Snapshotter
from cloudckpt.testing.local_s3 import SeaweedFS

HERE = Path(__file__).resolve().parent
ALTERNATIVES = ("s3torchconnector", "torch.save + boto3")


def settle(pid: int | None, limit: float = 10.0) -> None:
    """Wait (at most ``limit`` s) until the S3 server is idle: SeaweedFS compacts its
    volumes after the deletes between runs, and that would land on whatever runs next."""
    if pid is None:
        return
    proc, deadline = psutil.Process(pid), time.monotonic() + limit
    while time.monotonic() < deadline:
        before = sum(proc.cpu_times()[:2])
        time.sleep(0.25)
        if sum(proc.cpu_times()[:2]) - before < 0.0125:  # under 5% of a core
            return


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Tiers:
    """cloudckpt's tiered operations on one model and optimizer."""

    def __init__(self, model: Any, opt: Any, bucket: str, local: str) -> None:
        self.model, self.opt, self.bucket, self.local = model, opt, bucket, local
        self.snap = Snapshotter()
        self.snap.copy(compare.state_of(model, opt))  # buffers allocated once, reused

    def manager(self, uri: str, root: str, **kw: Any) -> CheckpointManager:
        tier = LocalTier(root, every_steps=1, host="bench")
        return CheckpointManager(uri, local=tier, health=None, exclusive=False, **kw)

    def copy(self) -> float:
        state = compare.state_of(self.model, self.opt)
        return timed(lambda: self.snap.copy(state))

    def local_save(self, asynchronous: bool) -> tuple[float, float | None, str, str]:
        """(seconds until the first local save of a run is durable on the tier -- every
        blob written --, the blocked seconds of its second save if async -- a snapshot
        into the first one's buffers, as every save after the first --, uri, root)."""
        uri = f"{self.bucket}/tiers-{uuid.uuid4().hex[:6]}"
        root = tempfile.mkdtemp(dir=self.local)
        mgr = self.manager(uri, root, async_save=asynchronous, save_every_steps=10**9)
        mgr.restore(model=self.model, optimizer=self.opt)
        t0 = time.perf_counter()
        mgr.step(1)
        mgr.wait()
        seconds = time.perf_counter() - t0
        if asynchronous:
            mgr.step(2)
            mgr.wait()
        report = mgr.last_local_save
        mgr.close()
        blocked = report.blocked_seconds if asynchronous and report else None
        return seconds, blocked, uri, root

    def local_restore(self, uri: str, root: str) -> float:
        mgr = self.manager(uri, root)
        seconds = timed(lambda: mgr.restore(model=self.model, optimizer=self.opt))
        mgr.close()
        return seconds

    def upload_from_tier(self, uri: str, root: str) -> float:
        """A bucket save of a state already in the local tier (the manager's periodic
        bucket save: a local save, then the upload from the tier)."""
        mgr = self.manager(uri, root, save_every_steps=3)
        mgr.restore(model=self.model, optimizer=self.opt)
        seconds = timed(lambda: mgr.step(3))
        mgr.close()
        return seconds

    def cache_restore(self, uri: str) -> float:
        cache = tempfile.mkdtemp(dir=self.local)
        options = RepoOptions(cache=CacheOptions(cache))
        into = {"model": self.model, "optimizer": self.opt}
        Repo(uri, options=options).load(into=into)  # fills the cache
        seconds = timed(lambda: Repo(uri, options=options).load(into=into))  # a restart
        shutil.rmtree(cache, ignore_errors=True)
        return seconds


def main(argv: list[str] | None = None) -> None:
    # A SIGTERM (timeout, a CI runner) unwinds like Ctrl-C: the S3 server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["gpt2", "small"], default="gpt2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--local", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--out", help="where RESULTS-tiers.md goes (default: benchmarks/)")
    args = p.parse_args(argv)
    out = Path(args.out or (HERE if args.preset == "gpt2" else HERE / "small"))
    out.mkdir(parents=True, exist_ok=True)
    model, opt = compare.build(args.preset)
    logical = compare.logical_bytes(model, opt)
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float | None) -> None:
        if value is not None:
            rows.setdefault(name, []).append(value)
            print(f"  {name}: {value:.3f}", flush=True)

    with SeaweedFS() as server:
        os.environ.update(server.env())
        client = server.client()
        bucket = f"s3://{server.create_bucket()}"
        alternatives = [
            c
            for c in compare.contenders(model, opt, client, server.endpoint)
            if c.name in (*ALTERNATIVES, "cloudckpt")
        ]
        tiers = Tiers(model, opt, bucket, args.local or tempfile.gettempdir())
        for rep in range(args.repeats):
            print(f"rep {rep}", flush=True)
            for c in alternatives:
                uri = f"{bucket}/{c.name.replace(' ', '-').replace('+', '')}-{rep}"
                settle(server.pid)
                try:
                    seconds = timed(lambda c=c, u=uri: c.save(u))
                except ImportError as e:  # s3torchconnector: `make bench` installs it
                    print(f"  {c.name}: not installed ({e}); left out", flush=True)
                    alternatives.remove(c)
                    continue
                add(f"{c.name}: bucket save", seconds)
                settle(server.pid)
                add(f"{c.name}: bucket restore", timed(lambda c=c, u=uri: c.restore(u)))
                compare.delete_prefix(client, uri)
            settle(server.pid)
            add("one copy into reused buffers", tiers.copy())
            seconds, _, _, root = tiers.local_save(asynchronous=False)
            add("local tier: sync save", seconds)
            shutil.rmtree(root, ignore_errors=True)
            seconds, blocked, uri, root = tiers.local_save(asynchronous=True)
            add("local tier: async save, blocked", blocked)
            settle(server.pid)
            add("local tier: restore after a restart", tiers.local_restore(uri, root))
            add("local tier: bucket save uploaded from the tier", tiers.upload_from_tier(uri, root))
            settle(server.pid)
            add("blob cache: restore after a restart", tiers.cache_restore(uri))
            shutil.rmtree(root, ignore_errors=True)
            compare.delete_prefix(client, uri)
    write_report(out / "RESULTS-tiers.md", args, rows, logical)


def write_report(path: Path, args: Any, rows: dict[str, list[float]], logical: int) -> None:
    med = {name: compare.median(values) for name, values in rows.items()}
    ran = [a for a in ALTERNATIVES if f"{a}: bucket save" in med]
    fastest_save = min(ran, key=lambda a: med[f"{a}: bucket save"])
    fastest_restore = min(ran, key=lambda a: med[f"{a}: bucket restore"])
    alt_save = med[f"{fastest_save}: bucket save"]
    alt_restore = med[f"{fastest_restore}: bucket restore"]
    copy = med["one copy into reused buffers"]
    where = args.local or tempfile.gettempdir()
    lines = [
        "# Tiers: the local tier and the blob cache against the bucket path",
        "",
        f"`python benchmarks/tiers.py --preset {args.preset} --repeats {args.repeats}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs, {platform.python_version()}, torch "
        f"{torch.__version__}), {time.strftime('%Y-%m-%d %H:%M')}: "
        f"{logical / 1e6:.0f} MB of tensors; bucket = a local SeaweedFS on the same "
        f"machine; local tier and cache in `{where}`. Median of the repetitions; "
        "before each measurement the S3 server is let go idle (it compacts after deletes).",
        "",
        "| operation | seconds: median (range) | runs |",
        "|---|---|---|",
        *(
            f"| {n} | {med[n]:.3f} ({min(v):.3f}-{max(v):.3f}) | {len(v)} |"
            for n, v in rows.items()
        ),
        "",
        "## Against the targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]

    def target(text: str, value: float, bound: float, base: float) -> str:
        ratio = value / base
        return f"| {text} | {ratio:.2f}x ({value:.3f} s) | {'yes' if ratio <= bound else 'no'} |"

    lines += [
        target(
            f"restore from the local tier <= 0.2x the fastest alternative's bucket restore "
            f"({fastest_restore}, {alt_restore:.2f} s)",
            med["local tier: restore after a restart"],
            0.2,
            alt_restore,
        ),
        target(
            f"restore from the blob cache <= 0.2x the fastest alternative's bucket restore "
            f"({fastest_restore}, {alt_restore:.2f} s)",
            med["blob cache: restore after a restart"],
            0.2,
            alt_restore,
        ),
        target(
            f"local-tier async save: blocking <= 1.1x one copy into reused buffers ({copy:.3f} s)",
            med["local tier: async save, blocked"],
            1.1,
            copy,
        ),
        target(
            f"sync local save <= 0.2x the fastest alternative's bucket save "
            f"({fastest_save}, {alt_save:.2f} s)",
            med["local tier: sync save"],
            0.2,
            alt_save,
        ),
        "",
        "A bucket save of a version already in the local tier is a local save plus an "
        "upload that reads the tier's blobs (by hash, verified) instead of a second "
        "snapshot: compare its row with cloudckpt's own bucket save.",
        "",
    ]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
