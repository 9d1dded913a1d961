"""Every code block of the README runs: the Python blocks in order against a local S3
server, the shell commands, and the CLI transcript replayed against a real repository."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudckpt import Repo, Resumed
from cloudckpt.cli import main as cli
from cloudckpt.testing.gpt import GPTConfig, train_state

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_every_block_is_of_a_kind_these_tests_run() -> None:
    fences = re.findall(r"^```(\w*)$", README.read_text(), flags=re.M)
    kinds = fences[0::2]  # openers; every other fence closes a block
    assert set(kinds) <= {"python", "bash", "console", "text"}, kinds  # text: no code
    assert len(blocks("python")) >= 3


def test_python_blocks_run(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto_server.env().items():
        monkeypatch.setenv(name, value)
    try:
        moto_server.create_bucket("my-bucket")
    except Exception as e:  # created by an earlier run of this test in the same session
        assert "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e)
    namespace: dict = {}
    for i, block in enumerate(blocks("python")):
        # Twice in a row, as a newcomer reruns a script: the repositories (memory:// lives
        # as long as the process, s3:// on the server) keep what the first run wrote.
        for run in (1, 2):
            namespace.pop("start", None)
            code = compile(block, f"README.md[python block {i}, run {run}]", "exec")
            exec(code, namespace)
            start = namespace.get("start")
            if run == 2 and isinstance(start, Resumed):  # a rerun resumes, never from scratch
                assert not start.fresh and start.step > 0, (i, start)


def commands(block: str) -> list[str]:
    joined = block.replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip()]


def test_shell_commands_run(seaweedfs: Any, tmp_path: Path) -> None:
    """``make demo`` is the demo script test_examples runs, ``make test`` is what CI runs;
    the rest run here, on the local server, shortened."""
    ran = 0
    for command in (c for block in blocks("bash") for c in commands(block)):
        if command in ("make demo", "make test"):
            continue
        argv = shlex.split(command)
        assert argv[0] == "torchrun", f"add a way to run README command: {command}"
        argv = [a if not a.startswith("s3://") else seaweedfs.fresh_uri("readme") for a in argv]
        argv[argv.index("--steps") + 1] = "4"
        argv[argv.index("--log-file") + 1] = str(tmp_path / "train.jsonl")
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]],
            cwd=ROOT, env={**os.environ, **seaweedfs.env()},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        ran += 1
    assert ran >= 1
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def shape(line: str) -> str:
    """A line with its numbers and ids blanked: what must match between runs."""
    line = re.sub(r"\d{8}T\d{9}Z-[0-9a-f]{8}", "<id>", line)
    return re.sub(r"\d[\d.,:-]*", "#", line).strip()


def test_cli_transcript_replays(
    seaweedfs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    (transcript,) = blocks("console")
    uri = seaweedfs.fresh_uri("readme")
    repo = Repo(uri)
    cfg = GPTConfig(n_layer=1)
    ours = {
        step: repo.commit(train_state(cfg, 1, seed=step), step=step, metrics={"loss": 3.0}).id
        for step in (20, 40, 60)
    }
    # The README's ids, by the step the log shows for them.
    theirs = {int(m[2]): m[1] for m in re.finditer(r"\*  (\S+) .*?step (\d+)", transcript)}
    ids = {theirs[step]: vid for step, vid in ours.items()}
    steps = [(m[1], m[2]) for m in re.finditer(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", transcript, re.M)]
    last_code = 0
    for command, expected in steps:
        for old, new in ids.items():
            command, expected = command.replace(old, new), expected.replace(old, new)
        command = command.replace("s3://ckpt/runs/gpt", uri)
        expected = expected.replace("s3://ckpt/runs/gpt", uri)
        if command == "echo $?":
            assert expected.strip() == str(last_code)
            continue
        head = re.search(r"\| head -(\d+)$", command)
        argv = shlex.split(command.split("|")[0])[1:]
        capsys.readouterr()
        last_code = cli(argv)
        out = capsys.readouterr()
        got = (out.out + out.err).splitlines()[: int(head[1]) if head else None]
        assert shape(got[0]) == shape(expected.splitlines()[0]), (command, got[:3])
        if argv[0] == "branch":  # the transcript's run trained on the new branch meanwhile
            ids[theirs[50]] = repo.commit(train_state(cfg, 1, seed=50), branch=argv[2],
                                          step=50, metrics={"loss": 2.71}).id  # fmt: skip
    assert last_code == 0 and (tmp_path / "model-bf16.safetensors").exists()
