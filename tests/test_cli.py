"""The cloudckpt command against a real S3 server: output, --json and exit codes."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cloudckpt import Repo
from cloudckpt.blobs import blob_key, progress
from cloudckpt.cli import main, parser
from cloudckpt.testing.gpt import GPT, GPTConfig, train_state


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


# -- issue 19: the command as git and awscli users expect --------------------------------
def ids(repo: Repo) -> dict[int, str]:
    """Version id by step: 100 and 200 on main, 150 on low-lr (forked from 100)."""
    return {v.step: v.id for v in repo.versions()}


def test_metadata_commands_never_import_torch_or_numpy(repo) -> None:
    """--help, --version and the commands that read metadata stay instant: a fresh
    interpreter runs them without importing torch or numpy."""
    script = f"""
import sys
from cloudckpt.cli import main
uri = {repo.uri!r}
for argv in (["ls", uri], ["log", uri], ["log", uri, "main~1"], ["show", uri, "low-lr"],
             ["branch", uri], ["tag", uri], ["gc", uri], ["ls", uri + "-none"]):
    main(argv)
for argv in (["--help"], ["--version"], ["show", "--help"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0
heavy = sorted({{"torch", "numpy"}} & set(sys.modules))
assert not heavy, heavy
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 150" in proc.stdout and "model.w" in proc.stdout


def test_global_options_go_before_or_after_the_command(repo, capsys, monkeypatch) -> None:
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    for argv in (
        ["--endpoint-url", endpoint, "--json", "ls", repo.uri],
        ["ls", repo.uri, "--json", "--endpoint-url", endpoint],
        ["--json", "ls", "--endpoint-url", endpoint, repo.uri],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv, err)
        assert set(json.loads(out)["branches"]) == {"main", "low-lr"}
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("cloudckpt ")


def test_refs_abbreviate_and_walk_ancestors_like_git(repo, capsys) -> None:
    by_step = ids(repo)
    repo.tag("release-1", by_step[200])
    for ref, step in [
        (by_step[150].rpartition("-")[2], 150),  # the random part, as copied from a log
        (by_step[150].rpartition("-")[2][:4], 150),
        (by_step[200][:19], 200),  # a prefix of the id
        ("main~1", 100),
        ("main^", 100),
        ("low-lr~1", 100),
        ("release-1^", 100),
        ("release-1~0", 200),
        ("latest~1", 100),  # latest: low-lr, step 150
    ]:
        code, out, err = run(capsys, "show", repo.uri, ref, "--json")
        assert code == 0, (ref, err)
        assert json.loads(out)["version"]["step"] == step, ref
    code, out, _ = run(capsys, "log", repo.uri, "main~1", "--json")
    assert code == 0 and [v["step"] for v in json.loads(out)] == [100]
    code, _, err = run(capsys, "show", repo.uri, by_step[100][:4])  # the year: all three
    assert code == 3 and "ambiguous" in err and all(v in err for v in by_step.values())
    code, _, err = run(capsys, "show", repo.uri, "main~2")
    assert code == 3 and "first version" in err
    code, _, err = run(capsys, "show", repo.uri, "abc")  # too short to abbreviate
    assert code == 3 and "no branch, tag or version named 'abc'" in err


def test_small_surprises_are_gone(repo, capsys) -> None:
    by_step = ids(repo)
    code, out, _ = run(capsys, "gc", repo.uri, "--dry-run")
    assert code == 0 and "would free" in out
    with pytest.raises(SystemExit) as usage:
        main(["gc", repo.uri, "--dry-run", "--yes"])
    assert usage.value.code == 2
    gc_help = parser()._subparsers._group_actions[0].choices["gc"].format_help()
    assert "(the default)" in gc_help
    # diff with one ref: what it changed from its parent, like `git show`
    code, out, _ = run(capsys, "diff", repo.uri, "low-lr", "--json")
    d = json.loads(out)
    assert code == 0 and (d["a"], d["b"]) == (by_step[100], by_step[150])
    assert [c["path"] for c in d["changed"]] == ["model.b", "model.w"]  # both moved since 100
    # log lists newest first, all of it or one lineage
    code, out, _ = run(capsys, "log", repo.uri, "--json")
    assert [v["step"] for v in json.loads(out)] == [150, 200, 100]
    code, out, _ = run(capsys, "log", repo.uri, "main", "--json")
    assert [v["step"] for v in json.loads(out)] == [200, 100]
    # no tags: no output at all (not an empty line)
    assert run(capsys, "tag", repo.uri) == (0, "", "")


def test_every_argument_has_help_and_every_command_an_example() -> None:
    top = parser()
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    texts = [top.format_help()]
    for action in top._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.dest
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        text = sub.format_help()
        assert "example:\n  cloudckpt " + name in text, name
        texts.append(text)
    for text in texts:
        assert "``" not in text and ":mod:" not in text


def test_export_format_follows_the_extension_and_strip_prefix_loads_strict(
    seaweedfs, monkeypatch, capsys, tmp_path
) -> None:
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    repo = Repo(seaweedfs.fresh_uri("cli-export"), seaweedfs.storage_options())
    state = train_state(GPTConfig(n_layer=1), steps=1)
    repo.commit(state, step=1)
    pt = tmp_path / "state.pt"
    assert run(capsys, "export", repo.uri, "main", str(pt))[0] == 0
    loaded = torch.load(pt, weights_only=True)  # a torch file, as its extension says
    assert loaded["state"]["step"] == 1
    code, _, err = run(capsys, "export", repo.uri, "main", str(pt), "--format", "safetensors")
    assert code == 1 and "torch file" in err
    for name in ("model.safetensors", "model.pth"):
        dest = tmp_path / name
        argv = ["export", repo.uri, "main", str(dest), "--keys", "model"]
        assert run(capsys, *argv, "--strip-prefix", "model.")[0] == 0
        flat = load_file(dest) if name.endswith(".safetensors") else torch.load(dest)
        fresh = GPT(GPTConfig(n_layer=1))
        fresh.load_state_dict(flat, strict=True)
        for key, tensor in fresh.state_dict().items():
            assert torch.equal(tensor, state["model"][key]), key
    whole = ["export", repo.uri, "main", str(tmp_path / "x.safetensors")]
    code, _, err = run(capsys, *whole, "--strip-prefix", "model.")  # the optimizer too
    assert code == 1 and "--keys model" in err


def test_progress_only_on_a_terminal(repo, capsys, monkeypatch, tmp_path) -> None:
    dest = tmp_path / "w.safetensors"
    code, out, err = run(capsys, "export", repo.uri, "main", str(dest))
    assert code == 0 and err == "" and out.startswith("exported ")  # a pipe: results only

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(progress, "DELAY", 0.0)
    monkeypatch.setattr(sys, "stderr", terminal)
    for argv in (["export", repo.uri, "main", str(dest)], ["verify", repo.uri, "low-lr"]):
        assert main(argv) == 0
    drawn = terminal.getvalue()
    assert "load" in drawn and "write" in drawn and "verify" in drawn and "B/s" in drawn


def test_ls_finds_a_repository_below_or_says_there_is_none(seaweedfs, capsys, monkeypatch):
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    root = seaweedfs.fresh_uri("cli-find")
    Repo(f"{root}/checkpoints/.cloudckpt").commit({"w": torch.ones(2)}, step=1)
    code, out, err = run(capsys, "ls", root)
    assert code == 3 and out == ""
    assert f"{root}/checkpoints/.cloudckpt" in err and "not a cloudckpt repository" in err
    for command in ("ls", "log"):
        code, out, err = run(capsys, command, f"{root}/nothing-here")
        assert code == 3 and out == "" and "not a cloudckpt repository" in err


def test_log_and_plot_keep_the_history_pruning_removed(seaweedfs, capsys, monkeypatch, tmp_path):
    for k, v in seaweedfs.env().items():
        monkeypatch.setenv(k, v)
    repo = Repo(seaweedfs.fresh_uri("cli-pruned"), seaweedfs.storage_options())
    state = {"w": torch.zeros(4)}
    main_ids = [
        repo.commit(state, step=s, metrics={"loss": 10 - s / 100}).id for s in range(10, 210, 10)
    ]
    repo.branch("fork", main_ids[9])  # step 100
    fork_ids = [
        repo.commit(state, branch="fork", step=s, metrics={"loss": 5.0}).id
        for s in (110, 120, 130, 140)
    ]
    repo.delete(main_ids[:-3] + fork_ids[:-3])  # what keep_last=3 leaves
    code, out, _ = run(capsys, "log", repo.uri, "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 24
    assert sum(not r["pruned"] for r in rows) == 6
    code, out, _ = run(capsys, "log", repo.uri)
    lines = out.splitlines()
    assert "|/" in lines  # the fork still joins main at its fork point
    fork_point = lines[lines.index("|/") + 1]
    assert main_ids[9] in fork_point and "(pruned) step 100" in fork_point
    code, out, _ = run(capsys, "log", repo.uri, "fork", "--json")
    assert [r["step"] for r in json.loads(out)][-3:] == [30, 20, 10]
    code, out, _ = run(capsys, "plot", repo.uri, str(tmp_path / "loss.png"), "--json")
    points = json.loads(out)["points"]
    assert points == {"fork": 5, "main": 20}  # the fork's line starts at step 100


def test_the_gc_grace_in_the_help_is_the_library_default() -> None:
    from cloudckpt.cli.parser import GC_GRACE
    from cloudckpt.gc import DEFAULT_GRACE

    assert GC_GRACE == DEFAULT_GRACE


def test_bash_completion_completes_commands_options_and_choices(capsys) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out

    def complete(*words: str) -> list[str]:
        quoted = " ".join(f"'{w}'" for w in words)
        probe = f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _cloudckpt; "
        probe += 'echo "${COMPREPLY[@]}"'
        proc = subprocess.run(
            ["bash", "-c", script + "\n" + probe], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert complete("cloudckpt", "l") == ["ls", "log"]
    assert complete("cloudckpt", "--endpoint-url", "http://x", "gc", "s3://b", "--d") == [
        "--dry-run"
    ]
    assert complete("cloudckpt", "export", "s3://b", "main", "f.pt", "--format", "") == [
        "safetensors",
        "torch",
    ]


def test_export_refuses_two_tensors_of_one_path_and_keeps_numpy_arrays(tmp_path, capsys):
    import numpy as np

    repo = Repo(f"file://{tmp_path}/repo")
    repo.commit({"model": {"a.b": torch.ones(3), "a": {"b": torch.zeros(3)}}})
    code, _, err = run(capsys, "export", repo.uri, "main", str(tmp_path / "x.safetensors"))
    assert code == 1 and "two tensors export as 'model.a.b'" in err
    assert not (tmp_path / "x.safetensors").exists()
    repo.commit({"model": {"w": torch.ones(2), "np_w": np.arange(4)}})
    code, _, err = run(capsys, "export", repo.uri, "main", str(tmp_path / "y.safetensors"))
    assert code == 0, err
    written = load_file(tmp_path / "y.safetensors")
    assert torch.equal(written["model.np_w"], torch.arange(4)), written


def test_export_and_import_files_on_s3_use_the_endpoint_flag(repo, capsys, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    out = repo.uri.rstrip("/") + "-export/model.safetensors"
    code, _, err = run(capsys, "--endpoint-url", endpoint, "export", repo.uri, "main", out)
    assert code == 0, err
    code, _, err = run(capsys, "--endpoint-url", endpoint, "import", repo.uri, out)
    assert code == 0, err
    assert repo.log("main")[0].meta["imported_from"] == out


def test_local_file_problems_are_exit_codes_not_tracebacks(repo, capsys, tmp_path) -> None:
    (tmp_path / "a-directory").mkdir()
    code, _, err = run(capsys, "export", repo.uri, "main", str(tmp_path / "a-directory"))
    assert code == 1 and "a-directory" in err
    code, _, err = run(capsys, "import", repo.uri, str(tmp_path / "missing.safetensors"))
    assert code == 3 and "missing.safetensors" in err
