"""Every code block of the README runs: the Python blocks in order against a local S3
server, the shell commands, and the CLI transcript replayed against a real repository."""

from __future__ import annotations

import importlib.util
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
EXAMPLES = ROOT / "examples"


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
    """``make demo`` is the demo script test_examples runs, ``make test`` is what CI runs,
    ``pip install`` is checked below; the training commands run here on the local server,
    shortened, twice in a row: the second run resumes where the first stopped."""
    ran = 0
    for command in (c for block in blocks("bash") for c in commands(block)):
        if command in ("make demo", "make test") or command.startswith("pip install"):
            continue
        argv = shlex.split(command)
        if argv[0] == "torchrun":
            argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
        elif argv[:2] == ["python", "examples/train_gpt.py"]:
            argv = [sys.executable, *argv[1:]]
        else:
            raise AssertionError(f"add a way to run README command: {command}")
        uri = seaweedfs.fresh_uri("readme")
        argv = [a if not a.startswith("s3://") else uri for a in argv]
        argv[argv.index("--steps") + 1] = "4"
        argv[argv.index("--log-file") + 1] = str(tmp_path / f"train-{ran}.jsonl")
        for run in (1, 2):
            out = subprocess.run(
                argv,
                cwd=ROOT,
                env={**os.environ, **seaweedfs.env()},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert out.returncode == 0, (command, run, out.stderr[-3000:])
            said = "fresh run" if run == 1 else "resumed at step 4"
            assert said in out.stdout, (command, run, out.stdout[-2000:])
        ran += 1
    assert ran >= 2
    assert "make test" in (ROOT / ".ci" / "run").read_text()


REPO_URL = "git+https://github.com/cloudckpt/cloudckpt"


def extras() -> set[str]:
    """The extras pyproject.toml defines."""
    text = (ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, re.M | re.S)
    assert section
    return set(re.findall(r"^([\w-]+) = ", section[1], re.M))


def test_install_commands_name_real_extras_and_pip_accepts_them() -> None:
    """Every extra is in the README's table; each ``pip install`` line names only real
    extras, and pip accepts it (a dry run, offline, without dependencies; the git URL
    pointed at this checkout's repository, i.e. its committed state)."""
    text = README.read_text()
    defined = extras()
    for extra in defined:
        assert f"| `{extra}` |" in text, f"extra {extra!r} missing from the README's table"
    installs = [c for b in blocks("bash") for c in commands(b) if c.startswith("pip install")]
    assert any(REPO_URL in c for c in installs), "no install from the git repository"
    assert any(" ." in c or ' ".[' in c for c in installs), "no install from a checkout"
    for command in installs:
        for named in re.findall(r"\[([\w,-]+)\]", command):
            assert set(named.split(",")) <= defined, command
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("no setuptools in this environment to build metadata offline")
    for command in installs:
        if REPO_URL in command and not (ROOT / ".git").exists():
            continue
        argv = shlex.split(command.replace(REPO_URL, f"git+file://{ROOT}"))
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                *argv[1:],
                "--dry-run",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--quiet",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, (command, out.stderr[-2000:])


def test_every_flag_of_the_example_is_shown() -> None:
    spec = importlib.util.spec_from_file_location("readme_train_gpt", EXAMPLES / "train_gpt.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = README.read_text()
    flags = [f for a in module.arguments(None)._actions for f in a.option_strings]
    missing = [f for f in flags if f not in ("-h", "--help") and f"`{f}`" not in text]
    assert not missing, f"README does not show these flags of train_gpt.py: {missing}"


def test_no_jargon_a_newcomer_cannot_place() -> None:
    """Words that meant something only to the people who wrote the README."""
    text = README.read_text().lower()
    for phrase in ("textbook", "this 2-core", "this machine", "this session", "these two cores"):
        assert phrase not in text, phrase


def shape(line: str) -> str:
    """A line with its numbers and ids blanked: what must match between runs."""
    line = re.sub(r"\d{8}T\d{9}Z-[0-9a-f]{8}", "<id>", line)
    return re.sub(r"\d[\d.,:-]*", "#", line).strip()


def test_cli_transcript_replays(
    seaweedfs: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
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
            ids[theirs[50]] = repo.commit(
                train_state(cfg, 1, seed=50), branch=argv[2], step=50, metrics={"loss": 2.71}
            ).id
    assert last_code == 0 and (tmp_path / "model-bf16.safetensors").exists()
