"""How long the ``cloudckpt`` command takes, start to exit, as a person runs it.

    python benchmarks/cli_startup.py [--runs 10] [--compare LABEL=SOURCE_DIR ...]

Each command runs ``--runs`` times in a fresh interpreter (the installed console script
does the same imports as ``python -m cloudckpt``); the median and the fastest run are
reported. The repositories are a local one (``file://``) and one on a local S3 server
(SeaweedFS on 127.0.0.1), each holding three versions of a small GPT. ``--compare``
also times another checkout of cloudckpt (e.g. the release before issue 19: ``git
archive <commit> | tar -x -C DIR``) on the same repositories, for a before/after table.

Writes benchmarks/RESULTS-cli.md. The goals (issue 19): --help <= 0.3 s, ls on a local
repository <= 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "RESULTS-cli.md"


def commands(local: str, s3: str) -> list[tuple[str, list[str]]]:
    """(label, argv) of every command timed."""
    return [
        ("--help", ["--help"]),
        ("--version", ["--version"]),
        ("ls (local)", ["ls", local]),
        ("log (local)", ["log", local]),
        ("show main (local)", ["show", local, "main"]),
        ("ls (S3)", ["ls", s3]),
        ("log (S3)", ["log", s3]),
        ("show main (S3)", ["show", s3, "main"]),
        ("verify main (S3: loads torch, reads every chunk)", ["verify", s3, "main"]),
    ]


def seconds(
    argv: list[str], env: dict[str, str], runs: int, cwd: str
) -> tuple[float, float] | None:
    """The median and fastest wall time of ``python -m cloudckpt ARGV`` over ``runs``
    (run in ``cwd``: ``-m`` puts the working directory first on the path, so it must not
    hold another checkout); None if the command fails."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "cloudckpt", *argv],
            env=env,
            capture_output=True,
            timeout=120,
            cwd=cwd,
        )
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:  # e.g. a flag an older release lacks
            print(f"cloudckpt {' '.join(argv)} failed: {proc.stderr.decode()[-300:]}")
            return None
    return statistics.median(times), min(times)


def cell(timing: tuple[float, float] | None) -> str:
    return "fails" if timing is None else f"{timing[0]:.2f} s ({timing[1]:.2f} s)"


def fill(uri: str, storage_options: dict[str, str] | None = None) -> None:
    """Three versions of a small GPT on main."""
    from cloudckpt import Repo
    from cloudckpt.testing.gpt import GPTConfig, train_state

    repo = Repo(uri, storage_options)
    for step in (10, 20, 30):
        repo.commit(
            train_state(GPTConfig(n_layer=2), 1, seed=step), step=step, metrics={"loss": 3.0}
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="runs per command (default 10)")
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        metavar="LABEL=DIR",
        help="also time the cloudckpt source tree in DIR, labelled LABEL",
    )
    args = p.parse_args(argv)
    from cloudckpt.testing.local_s3 import SeaweedFS

    trees = [("this tree", str(ROOT))] + [tuple(c.split("=", 1)) for c in args.compare]
    with tempfile.TemporaryDirectory() as tmp, SeaweedFS() as s3:
        local = f"file://{tmp}/repo"
        remote = s3.fresh_uri("cli-bench")
        fill(local)
        fill(remote, s3.storage_options())
        rows = commands(local, remote)
        results: dict[str, list[tuple[float, float] | None]] = {}
        for label, tree in trees:
            env = {**os.environ, **s3.env(), "PYTHONPATH": tree}
            results[label] = [seconds(argv, env, args.runs, tmp) for _, argv in rows]
            print(label, [cell(r) for r in results[label]], flush=True)
    heads = " | ".join(f"{label}: median (fastest)" for label, _ in trees)
    lines = [
        "# cloudckpt command start-up",
        "",
        f"Wall time of `python -m cloudckpt ...` from start to exit, median and fastest of "
        f"{args.runs} runs, each in a fresh interpreter. Local: a `file://` repository; S3: "
        "SeaweedFS on 127.0.0.1. Each repository holds three versions of a 2-layer GPT.",
        "Goals (issue 19): `--help` <= 0.3 s, `ls` on a local repository <= 0.5 s.",
        "",
        f"| command | {heads} |",
        "|---" * (len(trees) + 1) + "|",
    ]
    for i, (name, _) in enumerate(rows):
        cells = " | ".join(cell(results[t][i]) for t, _ in trees)
        lines.append(f"| `{name}` | {cells} |")
    lines += [
        "",
        "Metadata commands (ls, log, show, branch, tag, gc, --help, --version) import neither",
        "torch nor numpy (tests/test_cli.py checks it in a fresh interpreter); `diff` with",
        "norms, export, import and plot load torch when they touch tensors (verify: numpy).",
        "On S3 most of what remains is importing s3fs and aiobotocore (about 0.5 s by",
        "`python -X importtime`), which the store layer loads for any s3:// URI.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Command: `python benchmarks/cli_startup.py"
        + "".join(f" --compare {shlex.quote(c)}" for c in args.compare)
        + "`.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
