"""What the commands share: the repository their arguments name, exit codes, and output
as text or JSON."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Callable
from typing import Any

from cloudckpt import versions
from cloudckpt.blobs import TransferOptions
from cloudckpt.errors import (
    CheckpointNotFound,
    CloudCkptError,
    CommitConflict,
    CorruptCheckpoint,
    StoreError,
    UnsupportedState,
)
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.versions import Index, Version

EXIT_ERROR, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_CONFLICT, EXIT_STORE = 1, 3, 4, 5, 6


def exit_code(error: BaseException) -> int | None:
    """The documented exit code of an error a command raised; None for a bug."""
    for kind, code in (
        ((CheckpointNotFound, FileNotFoundError), EXIT_NOT_FOUND),
        (CorruptCheckpoint, EXIT_CORRUPT),
        (CommitConflict, EXIT_CONFLICT),
        (StoreError, EXIT_STORE),
        # OSError: a local file to export to or import from (a directory, no permission).
        ((CloudCkptError, UnsupportedState, ValueError, OSError), EXIT_ERROR),
    ):
        if isinstance(error, kind):
            return code
    return None


def file_options(args: argparse.Namespace, path: str) -> dict[str, Any] | None:
    """``storage_options`` for a file that is not the repository (export's destination,
    import's source): ``--endpoint-url`` applies to it too when it is on S3."""
    if args.endpoint_url and path.split("://", 1)[0] in ("s3", "s3a"):
        return {"endpoint_url": args.endpoint_url}
    return None


def progress_wanted(args: argparse.Namespace) -> bool:
    """A progress bar only for a person: stderr on a terminal, and no --json."""
    return sys.stderr.isatty() and not args.json


def open_repo(args: argparse.Namespace) -> Repo:
    """The repository at ``args.uri``."""
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    transfer = TransferOptions(progress=progress_wanted(args))
    return Repo(args.uri, opts, options=RepoOptions(transfer=transfer))


def existing_index(repo: Repo) -> Index:
    """The repository's index; CheckpointNotFound, with a hint, where there is none (an
    empty or missing prefix, or one holding repositories only below it)."""
    index, etag = versions.read(repo.store)
    if etag is not None:
        return index
    below = sorted(
        key.removesuffix(versions.KEY).rstrip("/")
        for key in repo.store.list_keys()
        if key.endswith("/" + versions.KEY)
    )
    if below:
        found = "\n".join(f"  {repo.uri.rstrip('/')}/{p}" for p in below[:10])
        raise CheckpointNotFound(
            f"{repo.uri}: not a cloudckpt repository, but it holds "
            f"{'one' if len(below) == 1 else len(below)} below it:\n{found}\n"
            f"(cloudckpt ls {repo.uri.rstrip('/')}/{below[0]})"
        )
    raise CheckpointNotFound(
        f"{repo.uri}: not a cloudckpt repository (no {versions.KEY}); check the URI, or "
        "commit a first version there"
    )


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    """Print ``data`` as JSON with --json, else ``text()`` (nothing if it is empty)."""
    out = json.dumps(data, indent=1, default=str) if args.json else text()
    if out:
        print(out)


def when(ts: float) -> str:
    """A UNIX time as UTC, to the second."""
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def metrics_text(v: Version) -> str:
    return " ".join(f"{k}={x:.4g}" for k, x in v.metrics.items())


def decorations(repo_index: Index, vid: str) -> str:
    """`` (main, tag: release-1)``: the branches and tags at version ``vid``."""
    names = [f"{b}" for b, h in repo_index.branches.items() if h == vid]
    names += [f"tag: {t}" for t, h in repo_index.tags.items() if h == vid]
    return f" ({', '.join(names)})" if names else ""
