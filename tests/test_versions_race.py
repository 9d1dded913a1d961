"""Two real processes hammering one branch: no version is lost, losers get conflicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudckpt import Repo

CHILD = str(Path(__file__).with_name("child_hammer.py"))
N = 8


@pytest.mark.parametrize("server", ["moto_server", "seaweedfs", "fake_gcs", "azurite"])
def test_two_processes_racing_on_one_branch_lose_nothing(server, request) -> None:
    srv = request.getfixturevalue(server)
    uri = srv.fresh_uri("race")
    env = {**os.environ, **srv.env()}
    procs = [
        subprocess.Popen(
            [sys.executable, CHILD, uri, str(N), name], stdout=subprocess.PIPE, text=True, env=env
        )
        for name in ("a", "b")
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        results.append(json.loads(out))
    committed = [vid for r in results for vid in r["committed"]]
    repo = Repo(uri, srv.storage_options())
    assert len(committed) == 2 * N
    assert {v.id for v in repo.versions()} == set(committed)
    # One linear history through every version: each commit built on the previous head.
    assert sorted(v.id for v in repo.log("main")) == sorted(committed)
    print(f"conflicts seen: {[r['conflicts'] for r in results]}")
