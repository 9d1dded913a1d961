"""Repositories written by the previous release (format 1) still load, commit, collect
and repair; the first write upgrades ``versions.json`` to format 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from assertions import assert_state_equal

from cloudckpt import Repo, manifest, versions
from cloudckpt.cli import main as cli

FIXTURE = Path(__file__).with_name("fixtures") / "format1"


def st(k: int) -> dict[str, Any]:
    return {
        "model": {
            "w": torch.arange(64, dtype=torch.float32).reshape(8, 8) * k,
            "b": torch.ones(8) * k,
        },
        "step": k,
    }


@pytest.fixture
def old(tmp_path: Path) -> Repo:
    shutil.copytree(FIXTURE, tmp_path / "repo")
    return Repo(f"file://{tmp_path}/repo")


def test_a_format1_repository_loads_every_version(old: Repo) -> None:
    assert json.loads(old.store.get(versions.KEY))["format"] == 1
    assert_state_equal(st(2), old.load("main"))
    assert_state_equal(st(3), old.load("exp"))
    assert_state_equal(st(1), old.load("good"))
    assert old.resolve("good").message == "first"
    assert all(old.verify(v.id).ok for v in old.versions())


def test_a_format1_repository_takes_commits_gc_and_repair(old: Repo) -> None:
    before = {v.id for v in old.versions()}
    new = old.commit(st(4), step=4)
    assert json.loads(old.store.get(versions.KEY))["format"] == versions.FORMAT
    assert old.manifest(new).format == manifest.FORMAT
    assert old.manifest(new.parent).format == 1
    report = old.gc(grace=0)
    assert not report.blobs and not report.manifests  # everything is still live
    old.store.put(versions.KEY, b"{garbled")
    rebuilt = old.repair()  # format-1 manifests predate markers: they count as published
    assert set(rebuilt.versions) == before | {new.id}
    assert rebuilt.branches["main"] == new.id
    assert_state_equal(st(4), old.load("main"))
    assert_state_equal(st(3), old.load("exp"))


def test_show_prints_the_manifest_format(old: Repo, capsys) -> None:
    assert cli(["show", old.uri, "main"]) == 0
    assert "format 1" in capsys.readouterr().out
