"""The ``cloudckpt`` command: inspect and manage a checkpoint repository.

Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 corrupt, 5 conflict, 6 store.
The S3 endpoint and credentials come from the standard AWS environment, or
``--endpoint-url``; credentials are never printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from cloudckpt.cli.common import EXIT_CONFLICT, EXIT_CORRUPT, EXIT_ERROR, EXIT_NOT_FOUND, EXIT_STORE
from cloudckpt.cli.data import cmd_export, cmd_import, cmd_plot, cmd_verify
from cloudckpt.cli.metadata import (
    cmd_branch,
    cmd_diff,
    cmd_gc,
    cmd_log,
    cmd_ls,
    cmd_repair,
    cmd_show,
    cmd_tag,
)
from cloudckpt.errors import (
    CheckpointNotFound,
    CloudCkptError,
    CommitConflict,
    CorruptCheckpoint,
    StoreError,
    UnsupportedState,
)
from cloudckpt.gc import DEFAULT_GRACE
from cloudckpt.redact import redact


def parser() -> argparse.ArgumentParser:
    """The ``cloudckpt`` argument parser, one subcommand per command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("uri", help="repository URI, e.g. s3://bucket/runs/gpt")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS env)")
    top = argparse.ArgumentParser(
        prog="cloudckpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help: str, example: str
    ) -> argparse.ArgumentParser:
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
        default=DEFAULT_GRACE,
        help="keep the data of versions deleted less than this many seconds ago, and "
        f"objects as young (default {DEFAULT_GRACE:g}; any value is safe for commits running "
        "meanwhile)",
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
    """Run the command in ``argv`` (default: the process's arguments); the exit code."""
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
