"""The commands on a repository's metadata: versions, branches, tags, the version graph,
diffs, garbage collection and repair."""

from __future__ import annotations

import argparse
import dataclasses
import json

from cloudckpt.blobs import iter_chunks
from cloudckpt.cli.common import (
    decorations,
    emit,
    existing_index,
    megabytes,
    metrics_text,
    open_repo,
    when,
)
from cloudckpt.cli.history import graph, newest_first, walk
from cloudckpt.errors import CheckpointNotFound


def cmd_ls(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    index = existing_index(repo)
    rows = list(index.versions.values())
    data = {
        "branches": index.branches,
        "tags": index.tags,
        "versions": [dataclasses.asdict(v) for v in rows],
    }

    def text() -> str:
        lines = [
            f"{'VERSION':30} {'BRANCH':12} {'STEP':>7} {'STORED':>10}  CREATED (UTC)        METRICS"
        ]
        for v in rows:
            lines.append(
                f"{v.id:30} {v.branch:12} {v.step if v.step is not None else '-':>7} "
                f"{megabytes(v.stored_bytes):>10}  {when(v.created)}  {metrics_text(v)}"
                f"{decorations(index, v.id)}"
            )
        return "\n".join(lines) if rows else f"{repo.uri}: no versions"

    emit(args, data, text)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    index = existing_index(repo)
    if args.ref:
        versions = list(walk(index, repo.rev_parse(args.ref, index).id))
    else:
        versions = newest_first(index.history())
    pruned = set(index.pruned) - set(index.versions)
    emit(
        args,
        [{**dataclasses.asdict(v), "pruned": v.id in pruned} for v in versions],
        lambda: "\n".join(graph(versions, lambda vid: decorations(index, vid), pruned)),
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    index = existing_index(repo)
    v = repo.rev_parse(args.ref, index)
    doc = repo.manifest(v)
    tensors = []
    for e in doc.tensors:
        chunks = list(iter_chunks(e))
        raw = sum(c.size for c in chunks)
        stored = sum(c.stored * c.size / max(c.blob_size, 1) for c in chunks)
        tensors.append(
            {
                "path": e["path"],
                "dtype": e["dtype"],
                "shape": e["shape"],
                "bytes": raw,
                "stored": round(stored),
                "chunks": len(chunks),
            }
        )
    data = {"version": dataclasses.asdict(v), "format": doc.format, "tensors": tensors}

    def text() -> str:
        ratio = v.stored_bytes / v.logical_bytes if v.logical_bytes else 1.0
        lines = [
            f"version  {v.id}{decorations(index, v.id)}",
            f"branch   {v.branch}   parent {v.parent or '-'}   format {doc.format}"
            + (f"   fence {v.fence}" if v.fence is not None else ""),
            f"step     {v.step}   metrics {metrics_text(v) or '-'}",
            f"created  {when(v.created)} UTC   took {v.seconds:.2f}s",
            f"size     {megabytes(v.logical_bytes)} logical, {megabytes(v.stored_bytes)} stored "
            f"(ratio {ratio:.3f}), {megabytes(v.uploaded_bytes)} uploaded by this commit",
        ]
        if v.message:
            lines.append(f"message  {v.message}")
        if v.meta:
            lines.append(f"meta     {json.dumps(v.meta, default=str)[:300]}")
        lines.append("")
        lines.append(f"{'TENSOR':48} {'DTYPE':9} {'SHAPE':18} {'BYTES':>11} {'STORED':>11} RATIO")
        for t in tensors:
            r = t["stored"] / t["bytes"] if t["bytes"] else 1.0
            shape = "x".join(map(str, t["shape"])) or "scalar"
            lines.append(
                f"{t['path'][:48]:48} {t['dtype']:9} {shape:18} {t['bytes']:>11,} "
                f"{t['stored']:>11,} {r:.3f}"
            )
        return "\n".join(lines)

    emit(args, data, text)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    index = existing_index(repo)
    b = repo.rev_parse(args.b or args.a, index)
    if args.b is None:  # like `git show REF`: what REF changed from its parent
        if b.parent is None:
            raise CheckpointNotFound(f"{args.a!r} ({b.id}) is a first version: no parent to diff")
        a = repo.rev_parse(b.id + "^", index)
    else:
        a = repo.rev_parse(args.a, index)
    d = repo.diff(a.id, b.id)

    def text() -> str:
        lines = [
            f"diff {d.a} -> {d.b}: {len(d.added)} added, {len(d.removed)} removed, "
            f"{len(d.changed)} changed ({megabytes(d.changed_bytes)}), {d.unchanged} unchanged"
        ]
        lines += [f"+ {p}" for p in d.added] + [f"- {p}" for p in d.removed]
        for c in d.changed:
            norm = f"  |b-a| = {c.norm:.6g}" if c.norm is not None else ""
            lines.append(
                f"~ {c.path}  {c.changed_bytes:,} of {c.total_bytes:,} bytes{norm} "
                f"{c.note}".rstrip()
            )
        return "\n".join(lines)

    emit(args, dataclasses.asdict(d), text)
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    index = existing_index(repo)
    if args.name is None:
        emit(
            args, index.branches, lambda: "\n".join(f"{b}  {h}" for b, h in index.branches.items())
        )
        return 0
    v = repo.branch(args.name, repo.rev_parse(args.from_ref, index).id)
    emit(args, {"branch": args.name, "head": v.id}, lambda: f"branch {args.name} -> {v.id}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    index = existing_index(repo)
    if args.name is None:
        emit(args, index.tags, lambda: "\n".join(f"{t}  {h}" for t, h in index.tags.items()))
        return 0
    v = repo.tag(args.name, repo.rev_parse(args.ref, index).id)
    emit(args, {"tag": args.name, "version": v.id}, lambda: f"tag {args.name} -> {v.id}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    report = open_repo(args).gc(grace=args.grace, dry_run=not args.yes)

    def text() -> str:
        verb = "would free" if report.dry_run else "freed"
        tail = "  (dry run: pass --yes to delete)" if report.dry_run else ""
        return (
            f"gc {verb} {megabytes(report.freed_bytes)}: {len(report.blobs)} blobs, "
            f"{len(report.manifests)} manifests; {report.kept_blobs} blobs kept{tail}"
        )

    emit(args, dataclasses.asdict(report), text)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    index = open_repo(args).repair()
    emit(
        args,
        {"versions": len(index.versions), "branches": index.branches},
        lambda: (
            f"repaired versions.json: {len(index.versions)} versions, branches "
            f"{', '.join(f'{b}={h}' for b, h in index.branches.items())}"
        ),
    )
    return 0
