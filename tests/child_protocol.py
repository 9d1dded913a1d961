"""A writer or a garbage collection that stops at a point so the test can freeze it.

Usage:
    python child_protocol.py commit URI BRANCH TTL   # lease, one commit, then a second one
                                                     # that pauses before publishing
    python child_protocol.py gc URI SWEEP_TTL         # gc(grace=0) pausing before deleting

At the pause point the child prints ``{"paused": true}`` and sleeps a few seconds, time
for the test to SIGSTOP it; after SIGCONT it goes on and prints its outcome as JSON.
S3 endpoint and credentials come from the AWS environment.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch

from cloudckpt import Repo
from cloudckpt.errors import FencedOut, SweepExpired
from cloudckpt.gc import collect
from cloudckpt.lease import WriterLease

PAUSE = 3.0


def say(**doc: Any) -> None:
    print(json.dumps(doc), flush=True)


def pause_once(obj: Any, name: str, when: Any = lambda *a, **k: True) -> None:
    """Make ``obj.name`` print ``paused`` and sleep before its first matching call."""
    original = getattr(obj, name)
    done: list[bool] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not done and when(*args, **kwargs):
            done.append(True)
            say(paused=True)
            time.sleep(PAUSE)
        return original(*args, **kwargs)

    setattr(obj, name, wrapped)


def commit(uri: str, branch: str, ttl: float) -> None:
    repo = Repo(uri)
    lease = WriterLease(repo.store, branch, ttl=ttl).acquire()
    first = repo.commit({"w": torch.full((256,), 1.0)}, branch=branch, fence=lease.fence)
    say(acked=first.id, fence=lease.fence)
    pause_once(repo.store, "put_if_absent", lambda key, data: key.startswith("manifests/"))
    try:
        second = repo.commit({"w": torch.full((256,), 2.0)}, branch=branch, fence=lease.fence)
        say(acked=second.id)
    except FencedOut as e:
        say(fenced=str(e))


def gc(uri: str, sweep_ttl: float) -> None:
    repo = Repo(uri)
    pause_once(repo.store, "delete")
    try:
        report = collect(repo.store, grace=0, sweep_ttl=sweep_ttl)
        say(blobs=report.blobs)
    except SweepExpired as e:
        say(expired=str(e))


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "commit":
        commit(args[0], args[1], float(args[2]))
    else:
        gc(args[0], float(args[1]))
