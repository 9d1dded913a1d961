"""The ``cloudckpt`` command: inspect and manage a checkpoint repository.

Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 corrupt, 5 conflict, 6 store.
The S3 endpoint and credentials come from the standard AWS environment, or
``--endpoint-url``; credentials are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cloudckpt.blobs import TransferOptions, iter_chunks
from cloudckpt.errors import (
    CheckpointNotFound,
    CloudCkptError,
    CommitConflict,
    CorruptCheckpoint,
    StoreError,
    UnsupportedState,
)
from cloudckpt.redact import redact
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.versions import Version

EXIT_ERROR, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_CONFLICT, EXIT_STORE = 1, 3, 4, 5, 6


def _repo(args: argparse.Namespace) -> Repo:
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    progress = sys.stderr.isatty() and not args.json
    return Repo(args.uri, opts, options=RepoOptions(transfer=TransferOptions(progress=progress)))


def _emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else text())


def _when(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _metrics(v: Version) -> str:
    return " ".join(f"{k}={x:.4g}" for k, x in v.metrics.items())


def _decorations(repo_index: Any, vid: str) -> str:
    names = [f"{b}" for b, h in repo_index.branches.items() if h == vid]
    names += [f"tag: {t}" for t, h in repo_index.tags.items() if h == vid]
    return f" ({', '.join(names)})" if names else ""


# -- commands ----------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    repo = _repo(args)
    index = repo.index()
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
                f"{_mb(v.stored_bytes):>10}  {_when(v.created)}  {_metrics(v)}"
                f"{_decorations(index, v.id)}"
            )
        return "\n".join(lines) if rows else f"{repo.uri}: no versions"

    _emit(args, data, text)
    return 0


def graph(versions: Sequence[Version], decorate: Callable[[str], str]) -> list[str]:
    """``git log --graph``-style lines for versions, newest first."""
    known = {v.id for v in versions}
    columns: list[str] = []
    lines = []
    for v in sorted(versions, key=lambda x: (x.created, x.id), reverse=True):
        if v.id not in columns:
            columns.append(v.id)
        col = columns.index(v.id)
        marks = " ".join("*" if i == col else "|" for i in range(len(columns)))
        step = f"step {v.step}" if v.step is not None else "no step"
        lines.append(f"{marks}  {v.id}{decorate(v.id)} {step} {_metrics(v)}".rstrip())
        parent = v.parent if v.parent in known else None
        if parent is None:
            columns.pop(col)
        elif parent in columns:  # a branch point: this column joins the parent's
            other = columns.index(parent)
            left, right = min(col, other), max(col, other)
            columns[left] = parent
            columns.pop(right)
            lines.append(" ".join(["|"] * right) + "/")
        else:
            columns[col] = parent
    return lines


def cmd_log(args: argparse.Namespace) -> int:
    repo = _repo(args)
    index = repo.index()
    versions = repo.log(args.ref) if args.ref else list(index.versions.values())
    _emit(
        args,
        [dataclasses.asdict(v) for v in versions],
        lambda: "\n".join(graph(versions, lambda vid: _decorations(index, vid))),
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    repo = _repo(args)
    v = repo.resolve(args.ref)
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
            f"version  {v.id}{_decorations(repo.index(), v.id)}",
            f"branch   {v.branch}   parent {v.parent or '-'}   format {doc.format}"
            + (f"   fence {v.fence}" if v.fence is not None else ""),
            f"step     {v.step}   metrics {_metrics(v) or '-'}",
            f"created  {_when(v.created)} UTC   took {v.seconds:.2f}s",
            f"size     {_mb(v.logical_bytes)} logical, {_mb(v.stored_bytes)} stored "
            f"(ratio {ratio:.3f}), {_mb(v.uploaded_bytes)} uploaded by this commit",
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

    _emit(args, data, text)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    d = _repo(args).diff(args.a, args.b)

    def text() -> str:
        lines = [
            f"diff {d.a} -> {d.b}: {len(d.added)} added, {len(d.removed)} removed, "
            f"{len(d.changed)} changed ({_mb(d.changed_bytes)}), {d.unchanged} unchanged"
        ]
        lines += [f"+ {p}" for p in d.added] + [f"- {p}" for p in d.removed]
        for c in d.changed:
            norm = f"  |b-a| = {c.norm:.6g}" if c.norm is not None else ""
            lines.append(
                f"~ {c.path}  {c.changed_bytes:,} of {c.total_bytes:,} bytes{norm} "
                f"{c.note}".rstrip()
            )
        return "\n".join(lines)

    _emit(args, dataclasses.asdict(d), text)
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    repo = _repo(args)
    if args.name is None:
        _emit(
            args,
            repo.branches(),
            lambda: "\n".join(f"{b}  {h}" for b, h in repo.branches().items()),
        )
        return 0
    v = repo.branch(args.name, args.from_ref)
    _emit(args, {"branch": args.name, "head": v.id}, lambda: f"branch {args.name} -> {v.id}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    repo = _repo(args)
    if args.name is None:
        _emit(args, repo.tags(), lambda: "\n".join(f"{t}  {h}" for t, h in repo.tags().items()))
        return 0
    v = repo.tag(args.name, args.ref)
    _emit(args, {"tag": args.name, "version": v.id}, lambda: f"tag {args.name} -> {v.id}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    report = _repo(args).verify(args.ref)

    def text() -> str:
        head = f"{report.version}: {report.blobs} blobs, {_mb(report.bytes)} checked"
        if report.ok:
            return head + ", all good"
        return "\n".join(
            [head + f", {len(report.problems)} BAD:"]
            + [f"  {k}: {why}" for k, why in report.problems.items()]
        )

    _emit(args, {**dataclasses.asdict(report), "ok": report.ok}, text)
    return 0 if report.ok else EXIT_CORRUPT


def cmd_gc(args: argparse.Namespace) -> int:
    report = _repo(args).gc(grace=args.grace, dry_run=not args.yes)

    def text() -> str:
        verb = "would free" if report.dry_run else "freed"
        tail = "  (dry run: pass --yes to delete)" if report.dry_run else ""
        return (
            f"gc {verb} {_mb(report.freed_bytes)}: {len(report.blobs)} blobs, "
            f"{len(report.manifests)} manifests; {report.kept_blobs} blobs kept{tail}"
        )

    _emit(args, dataclasses.asdict(report), text)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    index = _repo(args).repair()
    _emit(
        args,
        {"versions": len(index.versions), "branches": index.branches},
        lambda: (
            f"repaired versions.json: {len(index.versions)} versions, branches "
            f"{', '.join(f'{b}={h}' for b, h in index.branches.items())}"
        ),
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    meta = _repo(args).export(
        args.ref, args.destination, format=args.format, dtype=args.dtype, keys=args.keys or None
    )
    _emit(args, meta, lambda: f"exported {meta['cloudckpt_version']} to {args.destination}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    v = _repo(args).import_file(
        args.source, branch=args.branch, step=args.step, message=args.message
    )
    _emit(args, dataclasses.asdict(v), lambda: f"imported {args.source} as {v.id} on {v.branch}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("cloudckpt plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return EXIT_ERROR
    repo = _repo(args)
    series: dict[str, list[tuple[int, float]]] = {}
    for v in repo.versions():
        if (
            args.metric in v.metrics
            and v.step is not None
            and (not args.branch or v.branch in args.branch)
        ):
            series.setdefault(v.branch, []).append((v.step, v.metrics[args.metric]))
    if not series:
        print(f"no version has metric {args.metric!r}", file=sys.stderr)
        return EXIT_NOT_FOUND
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for branch, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=branch)
    ax.set_xlabel("step")
    ax.set_ylabel(args.metric)
    ax.set_title(f"{args.metric} per step: {repo.uri}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.output, dpi=100)
    _emit(
        args,
        {"output": args.output, "branches": sorted(series)},
        lambda: f"wrote {args.output} ({', '.join(sorted(series))})",
    )
    return 0


# -- parser ------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("uri", help="repository URI, e.g. s3://bucket/runs/gpt")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS env)")
    top = argparse.ArgumentParser(
        prog="cloudckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str, example: str):
        p = sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(fn=fn)
        return p

    add("ls", cmd_ls, "list versions, branches and tags", "cloudckpt ls s3://bucket/runs/gpt")
    p = add(
        "log",
        cmd_log,
        "the version graph (all branches, or one ref's lineage)",
        "cloudckpt log s3://bucket/runs/gpt",
    )
    p.add_argument("ref", nargs="?", help="branch, tag or version (default: all branches)")
    p = add(
        "show",
        cmd_show,
        "a version's metadata and tensor table",
        "cloudckpt show s3://bucket/runs/gpt main",
    )
    p.add_argument("ref", nargs="?", default="main")
    p = add(
        "diff",
        cmd_diff,
        "tensors added, removed and changed between two versions",
        "cloudckpt diff s3://bucket/runs/gpt release-1 main",
    )
    p.add_argument("a")
    p.add_argument("b", nargs="?", default="main")
    p = add(
        "branch",
        cmd_branch,
        "list branches, or create one from a version",
        "cloudckpt branch s3://bucket/runs/gpt low-lr 20261127T063012345Z-1a2b3c4d",
    )
    p.add_argument("name", nargs="?")
    p.add_argument("from_ref", nargs="?", default="main")
    p = add(
        "tag",
        cmd_tag,
        "list tags, or name a version (tags never move)",
        "cloudckpt tag s3://bucket/runs/gpt release-1 main",
    )
    p.add_argument("name", nargs="?")
    p.add_argument("ref", nargs="?", default="main")
    p = add(
        "verify",
        cmd_verify,
        "download, decompress and hash every chunk of a version",
        "cloudckpt verify s3://bucket/runs/gpt main",
    )
    p.add_argument("ref", nargs="?", default="main")
    p = add(
        "gc",
        cmd_gc,
        "delete data no live version uses (dry run unless --yes)",
        "cloudckpt gc s3://bucket/runs/gpt --yes",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=7200.0,
        help="keep the data of versions deleted less than this many seconds ago, and "
        "objects as young (default 7200; any value is safe for commits running meanwhile)",
    )
    p.add_argument("--yes", action="store_true", help="really delete")
    add(
        "repair",
        cmd_repair,
        "bring back published versions versions.json lost (rebuild it if unreadable)",
        "cloudckpt repair s3://bucket/runs/gpt",
    )
    p = add(
        "export",
        cmd_export,
        "write a version as one safetensors or torch file",
        "cloudckpt export s3://bucket/runs/gpt release-1 model.safetensors --dtype bf16 "
        "--keys model",
    )
    p.add_argument("ref")
    p.add_argument("destination", help="a path or URI")
    p.add_argument("--format", choices=["safetensors", "torch"], default="safetensors")
    p.add_argument("--dtype", choices=["bf16", "fp16"], help="cast floats (lossy)")
    p.add_argument("--keys", nargs="*", help="only these entries (names or globs)")
    p = add(
        "import",
        cmd_import,
        "commit a safetensors or weights-only torch file",
        "cloudckpt import s3://bucket/runs/gpt old.pt --step 1000",
    )
    p.add_argument("source")
    p.add_argument("--branch", default="main")
    p.add_argument("--step", type=int)
    p.add_argument("--message")
    p = add(
        "plot",
        cmd_plot,
        "a metric per step across versions and branches, to a PNG",
        "cloudckpt plot s3://bucket/runs/gpt loss.png --metric loss",
    )
    p.add_argument("output")
    p.add_argument("--metric", default="loss")
    p.add_argument("--branch", nargs="*", help="only these branches")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # `cloudckpt show ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CheckpointNotFound as e:
        code, err = EXIT_NOT_FOUND, e
    except CorruptCheckpoint as e:
        code, err = EXIT_CORRUPT, e
    except CommitConflict as e:
        code, err = EXIT_CONFLICT, e
    except StoreError as e:
        code, err = EXIT_STORE, e
    except (CloudCkptError, UnsupportedState, ValueError) as e:
        code, err = EXIT_ERROR, e
    print(f"cloudckpt: {redact(str(err))}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
