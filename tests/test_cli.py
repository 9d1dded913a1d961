"""The cloudckpt command against a real S3 server: output, --json and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cloudckpt import Repo
from cloudckpt.blobs import blob_key
from cloudckpt.cli import main


@pytest.fixture
def repo(seaweedfs, monkeypatch) -> Repo:
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    repo = Repo(seaweedfs.fresh_uri("cli"), seaweedfs.storage_options())
    torch.manual_seed(0)
    state = {"model": {"w": torch.randn(256, 256), "b": torch.zeros(256)}, "step": 1}
    v1 = repo.commit(state, step=100, metrics={"loss": 2.5})
    state["model"]["b"] += 0.5
    repo.commit(state, step=200, metrics={"loss": 2.1})
    repo.branch("low-lr", v1.id)
    state["model"]["w"][0] += 1.0
    repo.commit(state, step=150, branch="low-lr", metrics={"loss": 2.3})
    return repo


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_log_draws_the_branch_graph(repo, capsys) -> None:
    code, out, _ = run(capsys, "log", repo.uri)
    lines = out.splitlines()
    assert code == 0
    assert lines[0].startswith("*  ") and "(low-lr)" in lines[0]
    assert lines[1].startswith("| *  ") and "(main)" in lines[1]
    assert lines[2] == "|/"
    assert lines[3].startswith("*  ") and "step 100" in lines[3]


def test_ls_show_and_json(repo, capsys) -> None:
    code, out, _ = run(capsys, "ls", repo.uri, "--json")
    data = json.loads(out)
    assert code == 0 and set(data["branches"]) == {"main", "low-lr"}
    assert [v["step"] for v in data["versions"]] == [100, 200, 150]
    code, out, _ = run(capsys, "show", repo.uri, "low-lr")
    assert code == 0 and "model.w" in out and "ratio" in out and "float32" in out


def test_diff_branch_tag_and_export(repo, capsys, tmp_path) -> None:
    code, out, _ = run(capsys, "diff", repo.uri, "main", "low-lr", "--json")
    d = json.loads(out)
    assert code == 0 and [c["path"] for c in d["changed"]] == ["model.w"]
    assert d["changed"][0]["norm"] == pytest.approx(16.0)
    assert run(capsys, "tag", repo.uri, "release-1", "main")[0] == 0
    assert run(capsys, "tag", repo.uri, "release-1", "low-lr")[0] == 5  # conflict
    dest = tmp_path / "w.safetensors"
    assert run(capsys, "export", repo.uri, "release-1", str(dest), "--dtype", "bf16")[0] == 0
    assert dest.stat().st_size > 0


def test_verify_exit_code_distinguishes_corrupt_and_not_found(repo, capsys) -> None:
    assert run(capsys, "verify", repo.uri, "main")[0] == 0
    digest = repo.manifest("main").tensors[0]["chunks"][0][0]
    repo.store.delete([blob_key(digest)])
    code, out, _ = run(capsys, "verify", repo.uri, "main")
    assert code == 4 and "missing" in out
    code, _, err = run(capsys, "show", repo.uri, "no-such-branch")
    assert code == 3 and "no branch, tag or version named 'no-such-branch'" in err


def test_gc_is_a_dry_run_unless_yes(repo, capsys) -> None:
    main_head = repo.resolve("main").id
    deleted = repo.delete(
        [v.id for v in repo.versions() if v.id != main_head and v.branch == "main"]
    )
    assert len(deleted) == 1
    keys = repo.store.list_keys()
    code, out, _ = run(capsys, "gc", repo.uri, "--grace", "0")
    assert code == 0 and "dry run" in out and repo.store.list_keys() == keys
    code, out, _ = run(capsys, "gc", repo.uri, "--grace", "0", "--yes", "--json")
    report = json.loads(out)
    assert code == 0 and report["manifests"] == [f"manifests/{deleted[0]}.json"]
    assert repo.store.list_keys() != keys


def test_plot_writes_a_png(repo, capsys, tmp_path) -> None:
    out = tmp_path / "loss.png"
    code, text, _ = run(capsys, "plot", repo.uri, str(out), "--metric", "loss")
    assert code == 0 and "low-lr" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_script_help_and_exit_code(repo) -> None:
    env = {**os.environ}
    helptext = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "gc", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert helptext.returncode == 0 and "example:" in helptext.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "cloudckpt", "show", repo.uri, "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "cloudckpt-local-secret" not in proc.stderr + proc.stdout
