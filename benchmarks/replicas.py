"""A replaced host's restore from its partner's replica against from the bucket.

    python benchmarks/replicas.py [--preset gpt2|small|tiny] [--hosts 2,4] [--repeats 2]
                                  [--tier-root DIR] [--out FILE]

Starts a local SeaweedFS, then for each host count launches a torchrun job (gloo, CPU)
with one rank per "host", each host a local tier directory of its own. Every rank builds
the same GPT + AdamW state (GPT-2 small after a real step, as benchmarks/compare.py does;
``--preset small`` or ``tiny`` for quick runs); rank 0 commits it to the bucket; every
host saves it locally on top of that bucket head and replicates it to its partner. Then
the last host is replaced (its directory wiped) and restores the same version twice,
alternating the order: from the bucket (``Repo.load`` into the model and optimizer), and
through ``recover`` (receive from the partner into its tier) and a load from the tier.
Prints a markdown table of the medians (and writes it to ``--out``). The hosts' local
tiers go under ``--tier-root`` (default: the temporary directory; ``/dev/shm`` for a
tier in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BRANCH = "main"


def build(preset: str) -> tuple[Any, Any]:
    """The model and AdamW after one real step (as every benchmark measures them)."""
    from cloudckpt.testing.gpt import benchmark_model

    return benchmark_model(preset)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from cloudckpt import LocalTier, Repo
    from cloudckpt.distributed import Group
    from cloudckpt.tiers.local import BucketHead, HostTier, TierRecord
    from cloudckpt.tiers.replicas import HostMap, recover, recreate, replicate

    dist.init_process_group("gloo")
    group = Group.detect(timeout=600)
    host = f"h{group.rank}"
    tier = HostTier(LocalTier(str(Path(args.root) / host), host=host), args.uri, BRANCH)
    hosts = HostMap.gather(group, host)
    lost = hosts.hosts[-1]
    model, opt = build(args.preset)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    bucket = Repo(args.uri)
    head = group.from_rank0(lambda: bucket.commit(state, branch=BRANCH, step=1).id)
    t0 = time.perf_counter()
    local = (
        tier.commit(state, 1, {}, {}, TierRecord(host, head))
        if hosts.is_leader(group.rank)
        else None
    )
    saved = time.perf_counter() - t0
    replicated = replicate(group, hosts, tier, local)
    into = {"model": model, "optimizer": opt}
    rows: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        row: dict[str, Any] = {}
        for way in ("bucket", "peer") if rep % 2 == 0 else ("peer", "bucket"):
            group.barrier()
            if host == lost and way == "peer":
                shutil.rmtree(tier.root)  # the host is replaced
            for p in model.parameters():  # nothing of the state left in memory
                p.data.zero_()
            group.barrier()
            t0 = time.perf_counter()
            if way == "bucket":
                if host == lost:
                    Repo(args.uri).load(head, into=into)
                row["bucket"] = time.perf_counter() - t0
            else:
                # As the manager does: the partners' replicas are re-created after the load.
                report = recover(group, hosts, tier, BucketHead(head), recreate_now=False)
                row["recover"] = time.perf_counter() - t0
                assert report.target is not None, report.reason
                if host == lost:
                    tier.repo.load(report.target.id, into=into)
                row["peer"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                recreate(group, hosts, tier, report)
                row["recreate"] = time.perf_counter() - t1
                row["received"] = report.bytes_received
            if host == lost:
                for k, v in model.state_dict().items():
                    assert torch.equal(v, expected[k]), k
        rows.append(row)
    found = group.all_gather_json(
        {
            "rows": rows,
            "save": saved,
            "replicate": replicated.seconds,
            "sent": replicated.bytes_sent,
        }
    )
    if group.rank == 0:
        logical = bucket.resolve(head).logical_bytes
        print(json.dumps({"logical": logical, "lost": found[-1], "ranks": found}), flush=True)
    dist.destroy_process_group()


def table(args: argparse.Namespace, results: dict[int, dict[str, Any]], load: str) -> str:
    logical = next(iter(results.values()))["logical"]
    lines = [
        "# A replaced host's restore: from its partner's replica vs from the bucket",
        "",
        f"`python benchmarks/replicas.py --preset {args.preset} --hosts {args.hosts} "
        f"--repeats {args.repeats}{f' --tier-root {args.tier_root}' if args.tier_root else ''}` "
        f"on {platform.node()} ({os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average before: {load}): GPT "
        f"({args.preset}) + AdamW, {logical / 1e6:.0f} MB, one rank per host; the bucket is "
        "a local SeaweedFS. Median seconds of the replaced host; peer = recover (receive "
        "from the partner into the local tier) + load from the tier into the model; the "
        "partner's replica is re-created after that, as the manager does.",
        "",
        "| hosts | bucket load | recover | peer total | peer / bucket | re-create the "
        "partner's replica after (s) | received (MB) | replicate a save (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for hosts, found in results.items():
        rows = found["lost"]["rows"]
        bucket = statistics.median(r["bucket"] for r in rows)
        rec = statistics.median(r["recover"] for r in rows)
        peer = statistics.median(r["peer"] for r in rows)
        after = statistics.median(r["recreate"] for r in rows)
        replicated = max(r["replicate"] for r in found["ranks"])
        lines.append(
            f"| {hosts} | {bucket:.2f} | {rec:.2f} | {peer:.2f} | {peer / bucket:.2f}x | "
            f"{after:.2f} | {rows[-1]['received'] / 1e6:.0f} | {replicated:.2f} |"
        )
    lines += [
        "",
        "Every host, the S3 server and gloo's TCP share this one machine: there is no "
        "network between hosts, and the bucket's objects are in this machine's page cache "
        "(a remote bucket only slows the bucket column). A replaced host's restore from "
        "its partner writes the state into its local tier before loading it, so it is "
        "bounded by the tier's write speed (a tier in memory: ``--tier-root /dev/shm``).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["gpt2", "small", "tiny"], default="gpt2")
    p.add_argument("--hosts", default="2,4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--tier-root", help="where the hosts' local tiers go")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--uri", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    from cloudckpt.testing.local_s3 import SeaweedFS

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    results: dict[int, dict[str, Any]] = {}
    with (
        SeaweedFS() as server,
        tempfile.TemporaryDirectory(prefix="replicas-", dir=args.tier_root) as tmp,
    ):
        for hosts in (int(h) for h in args.hosts.split(",")):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={hosts}",
                __file__,
                "--worker",
                "--preset",
                args.preset,
                "--repeats",
                str(args.repeats),
                "--uri",
                server.fresh_uri(f"replicas-{hosts}"),
                "--root",
                str(Path(tmp) / f"hosts-{hosts}"),
            ]
            out = subprocess.run(
                cmd,
                env={**os.environ, **server.env()},
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if out.returncode != 0:
                sys.exit(f"{hosts} hosts failed:\n{out.stdout[-2000:]}\n{out.stderr[-6000:]}")
            results[hosts] = json.loads(out.stdout.strip().splitlines()[-1])
            print(hosts, "hosts:", results[hosts]["lost"], flush=True)
    report = table(args, results, load)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
