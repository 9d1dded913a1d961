"""What the commands share: the repository their arguments name, exit codes, and output
as text or JSON."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Callable
from typing import Any

from cloudckpt.blobs import TransferOptions
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.versions import Index, Version

EXIT_ERROR, EXIT_NOT_FOUND, EXIT_CORRUPT, EXIT_CONFLICT, EXIT_STORE = 1, 3, 4, 5, 6


def open_repo(args: argparse.Namespace) -> Repo:
    """The repository at ``args.uri`` (a progress bar only on a terminal, without --json)."""
    opts = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    progress = sys.stderr.isatty() and not args.json
    return Repo(args.uri, opts, options=RepoOptions(transfer=TransferOptions(progress=progress)))


def emit(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    """Print ``data`` as JSON with --json, else ``text()``."""
    print(json.dumps(data, indent=1, default=str) if args.json else text())


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
