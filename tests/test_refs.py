"""Git-like refs (cloudckpt.refs) against names that would shadow them and damaged indexes,
from an adversarial review: nothing resolves silently to the wrong version, nothing hangs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cloudckpt import CheckpointNotFound, CorruptCheckpoint, Repo
from cloudckpt.cli import main


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    repo = Repo(f"file://{tmp_path}/repo")
    for step in range(4):
        repo.commit({"w": torch.full((2,), float(step))}, step=step)
    return repo


def chain(repo: Repo) -> list[str]:
    return [v.id for v in repo.log("main")]  # newest first


@pytest.mark.parametrize("name", ["main~1", "main^", "a:b", "x~"])
def test_names_holding_ref_syntax_are_refused(repo: Repo, name: str) -> None:
    with pytest.raises(ValueError, match="ref syntax"):
        repo.branch(name, "main")
    with pytest.raises(ValueError, match="ref syntax"):
        repo.tag(name, "main")
    with pytest.raises(ValueError, match="ref syntax"):
        repo.commit({"w": torch.ones(1)}, branch=name)
    assert repo.rev_parse("main~1").id == chain(repo)[1]


def test_a_name_that_abbreviates_a_version_is_refused(repo: Repo) -> None:
    second = chain(repo)[1]
    for name in (second[:-1], second.rpartition("-")[2]):
        with pytest.raises(ValueError, match=f"abbreviates version {second}"):
            repo.branch(name, "main")
        with pytest.raises(ValueError, match=f"abbreviates version {second}"):
            repo.tag(name, "main")
    assert repo.rev_parse(second.rpartition("-")[2]).id == second
    with pytest.raises(ValueError, match="abbreviates version"):
        repo.branch(second[:8], "main")  # the date: every version of the day


def test_a_parent_cycle_is_corrupt_and_far_ancestors_end_at_once(repo: Repo) -> None:
    head, parent = chain(repo)[:2]
    path = Path(repo.store.path("versions.json"))
    doc = json.loads(path.read_text())
    for row in doc["versions"]:
        if row["id"] == parent:
            row["parent"] = head  # main and main^ are each other's parent
    path.write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpoint, match="lead back"):
        repo.rev_parse("main~3")
    start = time.monotonic()
    with pytest.raises(CheckpointNotFound, match="goes past the first version"):
        repo.rev_parse("main~99999999999")
    assert time.monotonic() - start < 5
    assert main(["show", repo.uri, "main~3"]) == 4


def test_pruned_history_is_held_to_its_cap_when_read(repo: Repo) -> None:
    from cloudckpt import versions

    path = Path(repo.store.path("versions.json"))
    doc = json.loads(path.read_text())
    extra = versions.MAX_PRUNED + 50
    doc["pruned"] = [
        {
            "id": f"p{i:06d}",
            "branch": "old",
            "parent": None,
            "step": i,
            "metrics": {},
            "created": 1000.0 + i,
        }
        for i in range(extra)
    ]
    path.write_text(json.dumps(doc))
    index = repo.index()
    assert len(index.pruned) == versions.MAX_PRUNED
    assert "p000000" not in index.pruned and f"p{extra - 1:06d}" in index.pruned
    repo.tag("kept", "main")  # any write keeps the cap
    assert len(json.loads(path.read_text())["pruned"]) == versions.MAX_PRUNED
