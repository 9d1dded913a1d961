"""The commands that move a version's data: verify it, export it to a file, import one,
plot a metric across versions."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from cloudckpt.cli import history
from cloudckpt.cli.common import (
    EXIT_CORRUPT,
    EXIT_ERROR,
    EXIT_NOT_FOUND,
    emit,
    existing_index,
    file_options,
    megabytes,
    open_repo,
)


def cmd_verify(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    report = repo.verify(repo.rev_parse(args.ref).id)

    def text() -> str:
        head = f"{report.version}: {report.blobs} blobs, {megabytes(report.bytes)} checked"
        if report.ok:
            return head + ", all good"
        return "\n".join(
            [head + f", {len(report.problems)} BAD:"]
            + [f"  {k}: {why}" for k, why in report.problems.items()]
        )

    emit(args, {**dataclasses.asdict(report), "ok": report.ok}, text)
    return 0 if report.ok else EXIT_CORRUPT


def cmd_export(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    meta = repo.export(
        repo.rev_parse(args.ref).id,
        args.destination,
        format=args.format,
        dtype=args.dtype,
        keys=args.keys or None,
        strip_prefix=args.strip_prefix,
        storage_options=file_options(args, args.destination),
    )
    emit(args, meta, lambda: f"exported {meta['cloudckpt_version']} to {args.destination}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    v = open_repo(args).import_file(
        args.source,
        branch=args.branch,
        step=args.step,
        message=args.message,
        storage_options=file_options(args, args.source),
    )
    emit(args, dataclasses.asdict(v), lambda: f"imported {args.source} as {v.id} on {v.branch}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("cloudckpt plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return EXIT_ERROR
    repo = open_repo(args)
    series = history.series(existing_index(repo), args.metric, args.branch)
    if not series:
        print(f"no version has metric {args.metric!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for branch, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=branch)
    ax.set_xlabel("step")
    ax.set_ylabel(args.metric)
    ax.set_title(f"{args.metric} per step: {repo.uri}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    emit(
        args,
        {
            "output": args.output,
            "branches": sorted(series),
            "points": {b: len(points) for b, points in sorted(series.items())},
        },
        lambda: f"wrote {args.output} ({', '.join(sorted(series))})",
    )
    return 0
