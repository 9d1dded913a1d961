"""Real multi-rank jobs (torchrun, gloo on CPU) against SeaweedFS: replicated DDP state,
sharded FSDP state through the DCP backend, and preemption agreed across ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from processes import reaped, torchrun

from cloudckpt import Repo
from cloudckpt.distributed import shares
from cloudckpt.lease import WriterLease
from cloudckpt.store import Store

HERE = Path(__file__).resolve().parent
CHILD = str(HERE / "child_dist.py")
DDP_TRAIN = str(HERE.parent / "examples" / "ddp_train.py")


def run_job(server: Any, ranks: int, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        torchrun(ranks, *args),
        env={**os.environ, **server.env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


@pytest.mark.parametrize("ranks", [2, 4])
def test_replicated_state_saved_and_loaded_in_every_mode(seaweedfs: Any, ranks: int) -> None:
    """rank-0 and spread writes, each/rank0/spread reads: bit-exact on every rank (the
    child asserts it); a rank failing mid-upload leaves no version."""
    found = json.loads(run_job(seaweedfs, ranks, CHILD, "replicated", seaweedfs.fresh_uri("ddp")))
    assert found["world"] == ranks
    assert found["rank0"] == {"world": ranks, "write": "rank0"}
    per_rank = found["spread"]["uploaded_bytes"]
    assert len(per_rank) == ranks and all(n > 0 for n in per_rank)
    assert max(per_rank) < 0.6 * sum(per_rank)  # a share each, not one rank doing it all
    assert f"rank {ranks - 1}: StoreError" in found["failure"]


def test_sharded_state_saved_by_4_ranks_loads_on_2(seaweedfs: Any, tmp_path: Path) -> None:
    uri = seaweedfs.fresh_uri("dcp")
    env = {"EXPECTED": str(tmp_path / "expected.pt")}
    saved = json.loads(run_job(seaweedfs, 4, CHILD, "dcp_save", uri, env=env))
    loaded = json.loads(run_job(seaweedfs, 2, CHILD, "dcp_load", uri, env=env))
    repo = Repo(uri, seaweedfs.storage_options())
    versions = repo.versions()
    assert [v.step for v in versions] == [2, 3]  # dcp.save, then dcp.async_save
    assert saved["version"] == versions[0].id and loaded["loaded"] == versions[1].id
    assert all(v.meta.get("dcp") for v in versions)
    assert repo.verify().ok
    assert versions[1].uploaded_bytes == 0  # the same shards again: every blob reused


def worker_pids(launcher: subprocess.Popen[str]) -> dict[int, int]:
    """RANK -> pid of the workers torchrun started."""
    found = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None and "ddp_train" in " ".join(child.cmdline()):
            found[int(rank)] = child.pid
    return found


def read_log(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sigterm_to_one_rank_stops_every_rank_at_one_final_checkpoint(
    seaweedfs: Any, tmp_path: Path
) -> None:
    """And a new job resumes from it exactly: the losses match an uninterrupted run."""
    common = [
        "--steps",
        "60",
        "--save-every",
        "5",
        "--seed",
        "3",
        "--write",
        "spread",
        "--read",
        "spread",
    ]
    reference = tmp_path / "reference.jsonl"
    run_job(
        seaweedfs,
        2,
        DDP_TRAIN,
        "--uri",
        seaweedfs.fresh_uri("ref"),
        "--log-file",
        str(reference),
        *common,
    )

    uri, log = seaweedfs.fresh_uri("spot"), tmp_path / "spot.jsonl"
    job = subprocess.Popen(
        torchrun(2, DDP_TRAIN, "--uri", uri, "--log-file", str(log), *common),
        env={**os.environ, **seaweedfs.env()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with reaped(job):
        deadline = time.monotonic() + 120
        while len(read_log(log)) < 8 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.1)
        ranks = worker_pids(job)
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[1], signal.SIGTERM)  # the notice reaches rank 1 only
        stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr[-3000:]
    stopped = read_log(log)[-1]["step"]
    assert f"preempted: final checkpoint at step {stopped} is committed" in stdout
    head = Repo(uri, seaweedfs.storage_options()).resolve("main")
    assert head.step == stopped and head.meta["reason"] == "preemption (another rank)"
    assert stopped < 60

    resumed = run_job(seaweedfs, 2, DDP_TRAIN, "--uri", uri, "--log-file", str(log), *common)
    assert f"resumed at step {stopped}" in resumed
    assert read_log(log) == read_log(reference)


def test_shares_balance_bytes_and_are_the_same_on_every_rank() -> None:
    sizes = [64, 64, 64, 64, 8, 8, 8, 8, 1]
    owner = shares(sizes, 4)
    assert owner == shares(sizes, 4)
    load = [sum(s for s, o in zip(sizes, owner, strict=True) if o == r) for r in range(4)]
    assert max(load) - min(load) <= 9
    assert shares(sizes, 1) == [0] * len(sizes)


def test_a_lease_held_elsewhere_stops_every_rank_at_restore(seaweedfs: Any) -> None:
    """Only rank 0 takes the lease; its LeaseHeld must reach every rank promptly instead
    of leaving them in a collective until the group times out."""
    uri = seaweedfs.fresh_uri("lease")
    other = WriterLease(Store(uri, seaweedfs.storage_options()), "main", ttl=60)
    other.me = dataclasses.replace(other.me, host="another-machine")
    other.acquire()
    try:
        found = json.loads(run_job(seaweedfs, 2, CHILD, "lease_held", uri))
    finally:
        other.release()
    assert found["raised"] == "LeaseHeld" and found["seconds"] < 30


def test_async_saves_on_two_ranks_do_not_deadlock_with_the_training_steps(
    seaweedfs: Any, tmp_path: Path
) -> None:
    """The background commit's collectives and step()'s agreement ran on one gloo group
    and paired wrongly: the example hung after its first async save."""
    log = tmp_path / "async.jsonl"
    run_job(
        seaweedfs,
        2,
        DDP_TRAIN,
        "--uri",
        seaweedfs.fresh_uri("async"),
        "--steps",
        "12",
        "--save-every",
        "2",
        "--async-save",
        "--log-file",
        str(log),
    )
    assert len(read_log(log)) == 12  # every step ran, and the job ended


def test_ranks_agree_on_skipped_saves_background_errors_and_rollbacks(seaweedfs: Any) -> None:
    """Each rank decided alone whether a save was busy (skip) or had failed, and where to
    roll back to: with one rank's save thread slower, a spread commit paired the shares
    of two different steps (and verified), or ranks resumed different versions."""
    found = json.loads(run_job(seaweedfs, 2, CHILD, "async_skew", seaweedfs.fresh_uri("skew")))
    assert found["started"][0] == 2 and len(found["versions"]) >= 1
