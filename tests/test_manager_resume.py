"""Exact resume across processes: a run killed with SIGKILL and resumed in a new process
on an empty working directory matches an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from assertions import assert_state_equal

from cloudckpt import Repo

TRAIN = str(Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py")
STEPS, SAVE_EVERY, KILL_AFTER = 60, 10, 33


def train(server, uri: str, log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, **server.env(), "PYTHONHASHSEED": "0"}
    cmd = [
        sys.executable,
        TRAIN,
        "--uri",
        uri,
        "--steps",
        str(STEPS),
        "--save-every",
        str(SAVE_EVERY),
        "--log",
        str(log),
    ]
    out = open(cwd / "output.txt", "wb")  # noqa: SIM115 (the child holds it)
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def losses(log: Path) -> dict[int, float]:
    """Loss per step; a step trained again after the resume overwrites the earlier one."""
    out = {}
    for line in log.read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def last_step(log: Path) -> int:
    if not log.exists():
        return 0
    lines = log.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def test_killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(seaweedfs, tmp_path):
    straight_uri, resumed_uri = seaweedfs.fresh_uri("straight"), seaweedfs.fresh_uri("resumed")

    straight = train(seaweedfs, straight_uri, tmp_path / "straight.jsonl", tmp_path / "a")
    assert straight.wait(timeout=300) == 0, (tmp_path / "a" / "output.txt").read_text()[-3000:]

    log = tmp_path / "resumed.jsonl"
    first = train(seaweedfs, resumed_uri, log, tmp_path / "b")
    deadline = time.monotonic() + 120
    while last_step(log) < KILL_AFTER and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the run ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed_at = last_step(log)
    assert KILL_AFTER <= killed_at < STEPS

    second = train(seaweedfs, resumed_uri, log, tmp_path / "c")  # a fresh, empty directory
    assert second.wait(timeout=300) == 0, (tmp_path / "c" / "output.txt").read_text()[-3000:]

    expected = losses(tmp_path / "straight.jsonl")
    got = losses(log)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # every step's loss, bit for bit (JSON floats round-trip)
    opts = seaweedfs.storage_options()
    final_straight = Repo(straight_uri, opts).load()
    final_resumed = Repo(resumed_uri, opts).load()
    assert final_resumed["_cloudckpt"]["step"] == STEPS
    # Model, optimizer, LR schedule, data position and RNG states: all identical.
    assert_state_equal(final_straight, final_resumed)
