"""The cloudckpt command: inspect and manage a checkpoint repository.

Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 corrupt, 5 conflict, 6 store.
The S3 endpoint and credentials come from the standard AWS environment, or
--endpoint-url; credentials are never printed. --json and --endpoint-url go before or
after the command. Refs: a branch, a tag, a version id or a unique abbreviation of one
(4 characters or more of the id or of its random part), "latest", and REF~N or REF^ for
ancestors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

import cloudckpt
from cloudckpt.cli.completion import SHELLS

#: cloudckpt.gc.DEFAULT_GRACE (a test checks they agree): not imported, so that --help
#: does not load the store.
GC_GRACE = 2 * 3600.0

REF = "a branch, tag, version id or its abbreviation, or REF~N / REF^"


def _global_options(p: argparse.ArgumentParser, on_command: bool) -> None:
    """--json and --endpoint-url, on the top parser and on each command (where they have
    no default, so as not to undo the value given before the command)."""
    unset = argparse.SUPPRESS
    p.add_argument(
        "--json",
        action="store_true",
        default=unset if on_command else False,
        help="machine-readable output",
    )
    p.add_argument(
        "--endpoint-url",
        metavar="URL",
        default=unset if on_command else None,
        help="S3-compatible endpoint (default: the AWS environment)",
    )


def parser() -> argparse.ArgumentParser:
    """The ``cloudckpt`` argument parser, one subcommand per command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("uri", help="repository URI, e.g. s3://bucket/runs/gpt")
    _global_options(common, on_command=True)
    top = argparse.ArgumentParser(
        prog="cloudckpt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  cloudckpt --endpoint-url http://127.0.0.1:8333 log s3://bucket/runs/gpt",
    )
    top.add_argument("--version", action="version", version=f"cloudckpt {cloudckpt.__version__}")
    _global_options(top, on_command=False)
    sub = top.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="what to do (cloudckpt COMMAND --help: its arguments and an example)",
    )

    def add(name: str, run: str, help: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(run=run)
        return p

    add(
        "ls",
        "metadata:cmd_ls",
        "list versions, branches and tags",
        "cloudckpt ls s3://bucket/runs/gpt",
    )
    p = add(
        "log",
        "metadata:cmd_log",
        "the version graph, newest first (all branches, or one ref's lineage)",
        "cloudckpt log s3://bucket/runs/gpt main~3",
    )
    p.add_argument("ref", nargs="?", help=f"whose lineage to show: {REF} (default: all)")
    p = add(
        "show",
        "metadata:cmd_show",
        "a version's metadata and tensor table",
        "cloudckpt show s3://bucket/runs/gpt main^",
    )
    p.add_argument("ref", nargs="?", default="main", help=f"{REF} (default: main)")
    p = add(
        "diff",
        "metadata:cmd_diff",
        "tensors added, removed and changed between two versions (one ref: from its parent)",
        "cloudckpt diff s3://bucket/runs/gpt release-1 main",
    )
    p.add_argument("a", metavar="A", help=f"the version compared from: {REF}")
    p.add_argument(
        "b", metavar="B", nargs="?", help="the version compared to (default: A, from A's parent)"
    )
    p = add(
        "branch",
        "metadata:cmd_branch",
        "list branches, or create one from a version",
        "cloudckpt branch s3://bucket/runs/gpt low-lr 3dac9230",
    )
    p.add_argument("name", nargs="?", help="the new branch (default: list the branches)")
    p.add_argument(
        "from_ref",
        metavar="FROM",
        nargs="?",
        default="main",
        help=f"its head: {REF} (default: main)",
    )
    p = add(
        "tag",
        "metadata:cmd_tag",
        "list tags, or name a version (tags never move)",
        "cloudckpt tag s3://bucket/runs/gpt release-1 main",
    )
    p.add_argument("name", nargs="?", help="the new tag (default: list the tags)")
    p.add_argument(
        "ref", nargs="?", default="main", help=f"the version it names: {REF} (default: main)"
    )
    p = add(
        "verify",
        "data:cmd_verify",
        "download, decompress and hash every chunk of a version",
        "cloudckpt verify s3://bucket/runs/gpt main",
    )
    p.add_argument("ref", nargs="?", default="main", help=f"{REF} (default: main)")
    p = add(
        "gc",
        "metadata:cmd_gc",
        "delete data no live version uses (a dry run unless --yes)",
        "cloudckpt gc s3://bucket/runs/gpt --yes",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=GC_GRACE,
        help="keep the data of versions deleted less than this many seconds ago, and "
        f"objects as young (default {GC_GRACE:g}; any value is safe for commits running "
        "meanwhile)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--yes", action="store_true", help="really delete")
    mode.add_argument(
        "--dry-run", action="store_true", help="only report what would be deleted (the default)"
    )
    add(
        "repair",
        "metadata:cmd_repair",
        "bring back published versions versions.json lost (rebuild it if unreadable)",
        "cloudckpt repair s3://bucket/runs/gpt",
    )
    p = add(
        "export",
        "data:cmd_export",
        "write a version as one safetensors or torch file",
        "cloudckpt export s3://bucket/runs/gpt release-1 model.safetensors --dtype bf16 "
        "--keys model --strip-prefix model.",
    )
    p.add_argument("ref", help=f"the version to export: {REF}")
    p.add_argument("destination", help="a path or URI; .safetensors, .pt or .pth")
    p.add_argument(
        "--format",
        choices=["safetensors", "torch"],
        help="the file format (default: from the destination's extension, else safetensors)",
    )
    p.add_argument("--dtype", choices=["bf16", "fp16"], help="cast floats (lossy)")
    p.add_argument("--keys", nargs="*", help="only these entries (names or globs)")
    p.add_argument(
        "--strip-prefix",
        metavar="PREFIX",
        help="write 'model.wte.weight' as 'wte.weight' (a flat state dict that "
        "load_state_dict and safetensors loaders take as-is)",
    )
    p = add(
        "import",
        "data:cmd_import",
        "commit a safetensors or weights-only torch file",
        "cloudckpt import s3://bucket/runs/gpt old.pt --step 1000",
    )
    p.add_argument("source", help="a .safetensors or torch file: a path or URI")
    p.add_argument("--branch", default="main", help="the branch to commit on (default: main)")
    p.add_argument("--step", type=int, help="the training step to record")
    p.add_argument("--message", help="the version's message (default: where it came from)")
    p = add(
        "plot",
        "data:cmd_plot",
        "a metric per step across versions and branches, to a PNG",
        "cloudckpt plot s3://bucket/runs/gpt loss.png --metric loss",
    )
    p.add_argument("output", help="the PNG file to write")
    p.add_argument("--metric", default="loss", help="the metric to draw (default: loss)")
    p.add_argument("--branch", nargs="*", help="only these branches")
    p = sub.add_parser(
        "completion",
        help="a shell completion script",
        description="print a completion script for bash or zsh",
        epilog="example:\n  cloudckpt completion bash >> ~/.bashrc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=SHELLS, help="the shell: bash or zsh")
    p.set_defaults(run="completion:cmd_completion")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: the process's arguments); the exit code."""
    args = parser().parse_args(argv)
    # The command's module, and the store and errors it needs, load only now: --help and
    # --version stay instant, and metadata commands never import torch.
    from cloudckpt.cli.common import exit_code
    from cloudckpt.redact import redact

    module, name = args.run.split(":")
    command = getattr(importlib.import_module(f"cloudckpt.cli.{module}"), name)
    try:
        return command(args)
    except BrokenPipeError:  # `cloudckpt show ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"cloudckpt: {redact(str(e))}", file=sys.stderr)
        return code
