"""Crash harness: a real process SIGKILLed at 26 points of a commit and of a collection
(on SeaweedFS; on Azurite at 14 of them, the block-blob calls in place of multipart's).

Each time the repository must stay consistent: every visible version verifies, the head
loads bit-exact as one of the states committed, ``gc`` reclaims every orphan (blobs,
manifests, incomplete multipart uploads), and the next commit works.

A manager with a local tier is killed too (on SeaweedFS, at 8 points of a local save and
of an upload from the tier): a restart on the same host resumes the newest step that was
provably complete, every local version verifies and the bucket stays consistent.

And a rank of a job on two "hosts" (child_replica_crash.py: a zygote per rank, a gloo
group per job), at 11 points of a peer replica transfer -- the sender and, separately,
the receiver, counted at the transfer's frames and at the replica's store calls (its
index swap), 2 of them timed -- and 3 of a recovery to a replaced host: the other rank
fails with RanksUnreachable, every version of every tier and replica verifies (none
half-published), the job restarted finds the newest provably complete step bit-exact
(also with a host replaced: from its partner's replica when that replica's swap
landed), the next save is replicated, and a collection leaves only live data. A rank
frozen (SIGSTOP) mid-transfer fails the others within the group's timeout, and a
manager's local save survives it (REPLICA_POINTS, RECOVER_POINTS and the frozen tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from child_crash import OPTIONS, TierModel, state, tier_manager, tier_state
from processes import reaped

from cloudckpt import Repo
from cloudckpt.blobs import iter_chunks
from cloudckpt.blobs.chunks import blob_key

COMMIT_POINTS: list[Any] = [
    ["read_versioned", 1, "before"],
    ["put", 1, "before"],
    ["put", 1, "after"],
    ["put", 2, "before"],
    ["put", 3, "after"],
    ["put", 4, "after"],
    ["create_multipart_upload", 1, "after"],
    ["upload_part", 1, "after"],
    ["upload_part", 2, "before"],
    ["upload_part", 3, "after"],
    ["complete_multipart_upload", 1, "before"],
    ["complete_multipart_upload", 1, "after"],
    ["put_if_absent", 1, "before"],
    ["put_if_absent", 1, "after"],
    ["put_if_match", 1, "before"],
    ["put_if_match", 1, "after"],
    0.05,
    0.15,
    0.3,
    0.6,
    1.0,  # seconds after the commit process started
]
#: On GCS, a reduced set at the store's own calls (S3's multipart calls are S3's), and one
#: timed kill (0.3 s into the commit).
GCS_COMMIT_POINTS: list[Any] = [
    ["read_versioned", 1, "before"],
    ["put", 1, "after"],
    ["put", 4, "after"],
    ["put_if_absent", 1, "after"],
    ["put_if_match", 1, "before"],
    ["put_if_match", 1, "after"],
    0.3,
]
COLLECT_POINTS: list[Any] = [
    ["put_if_match", 1, "before"],  # the delete's swap
    ["put_if_match", 1, "after"],
    ["delete", 1, "before"],  # blobs
    ["delete", 1, "after"],
    ["delete", 2, "after"],  # manifests; the tombstone is not yet cleared
]


#: Azurite: the store calls' points and Azure's block calls for multipart's (a reduced
#: set: each point costs a commit and a gc).
AZURE_COMMIT_POINTS: list[Any] = [
    ["read_versioned", 1, "before"],
    ["put", 1, "after"],
    ["put", 3, "after"],
    ["stage_block", 1, "after"],
    ["stage_block", 2, "before"],
    ["commit_block_list", 1, "before"],
    ["commit_block_list", 1, "after"],
    ["put_if_absent", 1, "after"],
    ["put_if_match", 1, "before"],
    ["put_if_match", 1, "after"],
    0.3,
]
AZURE_COLLECT_POINTS: list[Any] = [
    ["put_if_match", 1, "after"],
    ["delete", 1, "after"],
    ["delete", 2, "after"],
]


#: A manager with a local tier, killed during a save of step 2 over a bucket step 1 (see
#: child_crash.py): each point (counted over the local and the bucket store's calls, from
#: the save on) with the step a restore must find, None for a timed kill (either, as the
#: local tier says). tier_save: the local commit (blobs, manifest, versions.json swap),
#: then the pruning of step 1 (the index swap, then its collection).
TIER_SAVE_POINTS: list[tuple[Any, int | None]] = [
    (["put", 1, "after"], 1),
    (["put_if_match", 1, "before"], 1),
    (["put_if_match", 1, "after"], 2),  # the local swap landed
    (["delete", 1, "after"], 2),  # collecting the pruned step 1
    (1.6, None),  # seconds after the child started (its restore takes about 1.5 s)
]
#: tier_upload: the same local save (put_if_match 1-4), then the upload from the tier:
#: blobs (multipart for the large one), manifest, the bucket's swap (put_if_match 5).
TIER_UPLOAD_POINTS: list[tuple[Any, int | None]] = [
    (["upload_part", 2, "before"], 2),
    (["put_if_match", 5, "after"], 2),  # the bucket's swap landed
    (1.9, None),
]
TIER_CASES = [
    *(("tier_save", p, want) for p, want in TIER_SAVE_POINTS),
    *(("tier_upload", p, want) for p, want in TIER_UPLOAD_POINTS),
]


@pytest.fixture(scope="module")
def zygote() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("child_crash.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    with reaped(proc):
        yield proc
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def crash(
    zygote: subprocess.Popen[str],
    server: Any,
    uri: str,
    action: str,
    point: Any,
    local: str | None = None,
) -> int:
    scenario = {
        "uri": uri,
        "env": server.env(),
        "action": action,
        "point": point if isinstance(point, list) else None,
        "after_seconds": point if isinstance(point, float) else None,
        "local": local,
    }
    assert zygote.stdin is not None and zygote.stdout is not None
    zygote.stdin.write(json.dumps(scenario) + "\n")
    zygote.stdin.flush()
    return json.loads(zygote.stdout.readline())["returncode"]


def assert_equal_state(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["step"] == want["step"]
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name


def assert_consistent_after_gc(repo: Repo, server: Any) -> None:
    """Every visible version verifies; gc leaves exactly what live versions reference."""
    for version in repo.versions():
        assert repo.verify(version.id).ok, version.id
    report = repo.gc(grace=0, abandoned_after=0)  # the killed writer's uploads too
    live = {v.id for v in repo.versions()}
    referenced = {
        blob_key(chunk.digest)
        for vid in live
        for entry in repo.manifest(repo.resolve(vid)).tensors
        for chunk in iter_chunks(entry)
    }
    assert set(repo.store.list_keys("blobs")) == referenced, report
    assert set(repo.store.list_keys("manifests")) == {f"manifests/{v}.json" for v in live}
    assert repo.index().deleted == {}
    if repo.uri.startswith("az://"):  # an upload's uncommitted blocks
        assert server.uncommitted_blobs(repo.uri) == []
        return
    if not repo.uri.startswith("s3://"):
        return  # GCS: a resumable upload leaves nothing visible, and none can be listed
    bucket, prefix = repo.uri.removeprefix("s3://").split("/", 1)
    uploads = server.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/")
    assert uploads.get("Uploads", []) == []


def label(point: Any) -> str:
    return f"{point}s" if isinstance(point, float) else "-".join(map(str, point))


#: (the server's fixture, a kill point) for each store the crash harness runs on.
COMMIT_CASES = [
    *(("seaweedfs", p) for p in COMMIT_POINTS),
    *(("fake_gcs", p) for p in GCS_COMMIT_POINTS),
    *(("azurite", p) for p in AZURE_COMMIT_POINTS),
]
COLLECT_CASES = [
    *(("seaweedfs", p) for p in COLLECT_POINTS),
    *(("fake_gcs", p) for p in COLLECT_POINTS),
    *(("azurite", p) for p in AZURE_COLLECT_POINTS),
]


def case_id(case: Any) -> str:
    return case if isinstance(case, str) else label(case)


@pytest.mark.parametrize(("server", "point"), COMMIT_CASES, ids=case_id)
def test_commit_killed_at(server: str, point: Any, zygote: Any, request: Any) -> None:
    commit_killed_at(point, zygote, request.getfixturevalue(server))


def commit_killed_at(point: Any, zygote: Any, server: Any) -> None:
    uri = server.fresh_uri("crash")
    repo = Repo(uri, server.storage_options(), options=OPTIONS)
    first = repo.commit(state(1), step=1)

    assert crash(zygote, server, uri, "commit", point) == -9

    head = repo.resolve("main")
    assert {v.id for v in repo.versions()} <= {first.id, head.id}
    if point == ["put_if_match", 1, "after"]:
        assert head.id != first.id, "the swap took effect: the new version is the head"
    assert_equal_state(repo.load(), state(1 if head.id == first.id else 2))
    assert_consistent_after_gc(repo, server)
    repo.commit(state(3), step=3)
    assert_equal_state(repo.load(), state(3))


@pytest.mark.parametrize(("server", "point"), COLLECT_CASES, ids=case_id)
def test_collection_killed_at(server: str, point: Any, zygote: Any, request: Any) -> None:
    collection_killed_at(point, zygote, request.getfixturevalue(server))


def collection_killed_at(point: Any, zygote: Any, server: Any) -> None:
    uri = server.fresh_uri("crash-gc")
    repo = Repo(uri, server.storage_options(), options=OPTIONS)
    first = repo.commit(state(1), step=1)
    second = repo.commit(state(2), step=2)

    assert crash(zygote, server, uri, "collect", point) == -9

    assert repo.resolve("main").id == second.id
    assert {v.id for v in repo.versions()} <= {first.id, second.id}
    assert_equal_state(repo.load(), state(2))
    assert_consistent_after_gc(repo, server)


def tier_case_id(case: Any) -> str:
    return label(case) if isinstance(case, (list, float)) else str(case)


@pytest.mark.parametrize(("action", "point", "want"), TIER_CASES, ids=tier_case_id)
def test_manager_with_a_local_tier_killed_at(
    action: str, point: Any, want: int | None, zygote: Any, seaweedfs: Any, tmp_path: Any
) -> None:
    """A manager with a local tier killed during a local save or an upload from the tier:
    a restart on the same host resumes the newest provably complete step exactly, the
    bucket stays consistent, every local version verifies, and the next save works."""
    server, uri, local = seaweedfs, seaweedfs.fresh_uri("crash-tier"), str(tmp_path / "tier")
    opts = server.storage_options()
    first = tier_manager(uri, local, 1, opts)
    model = TierModel(0)
    assert first.restore(model=model).fresh
    model.load_state_dict(tier_state(1))
    assert first.step(1).saved.tier == "bucket"  # local step 1, uploaded
    first.close()

    assert crash(zygote, server, uri, action, point, local) == -9

    mgr = tier_manager(uri, local, 1, opts)
    host = mgr.tiers.host
    landed = 2 in [v.step for v in host.versions()]  # the local save's swap took effect
    if want is not None:
        assert landed == (want == 2), host.versions()
    model = TierModel(0)
    start = mgr.restore(model=model)
    assert start.step == (2 if landed else 1)
    for name, tensor in tier_state(start.step).items():
        assert torch.equal(getattr(model, name), tensor), name
    bucket = Repo(uri, opts, options=OPTIONS)
    assert [v.step for v in bucket.versions()] in ([1], [1, 2])
    if action == "tier_save":
        assert [v.step for v in bucket.versions()] == [1], "a local save stays local"
    assert_consistent_after_gc(bucket, server)
    for version in host.versions():
        assert host.repo.verify(version.id).ok, version.id

    model.load_state_dict(tier_state(3))
    started = time.monotonic()
    assert mgr.step(3).saved.tier == "bucket"
    # A pruning killed mid-sweep leaves its sweep registered in the local index; the
    # next local save waits it out (seconds, not the bucket's minute).
    assert time.monotonic() - started < 20
    assert bucket.resolve("main").step == 3
    head = bucket.load()
    for name, tensor in tier_state(3).items():
        assert torch.equal(head["model"][name], tensor), name
    assert [v.step for v in host.versions()] == [3]
    assert host.repo.verify(host.versions()[0].id).ok
    mgr.close()


# -- peer replicas -------------------------------------------------------------------------
#: Two hosts, one rank each, each the other's partner (h0 -> h1 -> h0; see
#: child_replica_crash.py): steps 1 and 2 saved and replicated, then step 3 saved locally on
#: both and replicated, the victim rank killed during that transfer. Counted in the victim
#: from the start of the transfer; h0 -> h1 moves eight blobs (h0's own part; the shared
#: one h1 links from its own tier). Each point: the victim (0: h0, the sender of the
#: conversation h0 -> h1; 1: h1, its receiver), the point, and the step a restore must
#: find with h0's tier lost -- 3 if h1's replica of h0's step 3 was published before the
#: kill, else 2, the newest step both hosts still reach; None: either, as h1's replica
#: says (a timed kill, or one after every blob was sent: the receiver may publish a
#: complete replica before it notices). With every tier in place a restore finds step 3:
#: both local saves landed before the transfer began.
REPLICA_POINTS: list[tuple[int, Any, int | None]] = [
    (0, ["manifest", 1, "after"], 2),  # the sender sent the manifest; nothing asked yet
    (0, ["blob_sent", 1, "after"], 2),
    (0, ["blob_sent", 8, "after"], None),  # every blob sent
    (1, ["lack", 1, "after"], 2),  # the receiver named the digests it lacks
    (1, ["blob_received", 1, "after"], 2),
    (1, ["blob_received", 4, "after"], 2),  # mid-way through the blobs
    (1, ["put_if_match", 1, "before", "replica"], 2),  # just before the replica's index swap
    (1, ["put_if_match", 1, "after", "replica"], 3),  # just after it: published
    (1, ["delete", 1, "after", "replica"], 3),  # pruning the replica's step 1, mid-collection
    (0, 0.15, None),  # seconds into the transfer (the victim's blobs paced: 0.05 s each)
    (1, 0.25, None),
]
#: h0's tier lost after step 3 was replicated; h0 or h1 killed while the tiers are
#: recovered: h0 receives its step 3 from h1's replica of it, then its replica of h1
#: from h1. Each point: the victim, the point, and the steps h0's own tier holds after
#: the kill. A restore (the same hosts again, h0 with whatever it kept) must find step 3.
RECOVER_POINTS: list[tuple[int, Any, list[int]]] = [
    (0, ["blob_received", 2, "after"], []),  # h0 receiving its own step 3
    (1, ["blob_sent", 1, "after"], []),  # h1 sending it
    (0, ["put_if_match", 1, "after", "own"], [3]),  # published; its replica of h1 not yet
]


@pytest.fixture(scope="module")
def rank_zygotes() -> Iterator[list[subprocess.Popen[str]]]:
    """Three zygotes of child_replica_crash.py, ranks 0-2 (a job takes the first ranks)."""
    here = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)]),
        "OMP_NUM_THREADS": "1",
    }
    with contextlib.ExitStack() as stack:
        procs = []
        for rank in range(3):
            proc = subprocess.Popen(
                [sys.executable, str(here / "child_replica_crash.py"), str(rank)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            procs.append(stack.enter_context(reaped(proc)))
        yield procs
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            proc.wait(timeout=30)


class RankJob:
    """One job of the rank zygotes: every rank's exit status and what it wrote."""

    def __init__(self, zygotes: list[subprocess.Popen[str]], base: Path) -> None:
        self.zygotes, self.base, self.count = zygotes, base, 0

    def run(self, scenario: dict[str, Any], frozen: int | None = None) -> list[dict[str, Any]]:
        """Run ``scenario`` on every rank; ``frozen``: a rank that stops itself, SIGKILLed
        once every other rank ended."""
        self.count += 1
        out = self.base / f"out-{self.count}"
        scenario = {**scenario, "rendezvous": str(self.base / f"rdv-{self.count}"), "out": str(out)}
        world = scenario.get("world", 2)
        for z in self.zygotes:
            assert z.stdin is not None
            z.stdin.write(json.dumps(scenario) + "\n")
            z.stdin.flush()
        pids = [json.loads(self._line(z))["pid"] for z in self.zygotes]
        ended: dict[int, Any] = {}
        for rank, z in enumerate(self.zygotes):
            if rank != frozen:
                ended[rank] = json.loads(self._line(z))
        if frozen is not None:
            kill_stopped(pids[frozen], self.zygotes[frozen].pid)  # the zygote reaps it
            ended[frozen] = json.loads(self._line(self.zygotes[frozen]))
        found = []
        for rank in range(world):
            path = Path(f"{out}.{rank}")
            record = json.loads(path.read_text()) if path.exists() else {}
            found.append({**ended[rank], **record})
        return found

    @staticmethod
    def _line(zygote: subprocess.Popen[str]) -> str:
        assert zygote.stdout is not None
        line = zygote.stdout.readline()
        assert line, "a rank zygote died"
        return line


def kill_stopped(pid: int, parent: int) -> None:
    """SIGKILL ``pid``, asserting it is stopped and still ``parent``'s child."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    assert state in ("T", "t") and int(ppid) == parent, f"rank not frozen: {stat}"
    os.kill(pid, signal.SIGKILL)


def assert_ranks_ok(found: list[dict[str, Any]]) -> None:
    for rank, record in enumerate(found):
        assert record["returncode"] == 0 and record["in_time"], (rank, record)


def replica_ids(cases: list[Any]) -> list[str]:
    """``rank<victim>-<point>`` of each case."""
    return [f"rank{case[0]}-{label(case[1])}" for case in cases]


@pytest.mark.parametrize(
    ("victim", "point", "want"), REPLICA_POINTS, ids=replica_ids(REPLICA_POINTS)
)
def test_a_replica_transfer_killed_at(
    victim: int, point: Any, want: int | None, rank_zygotes: Any, tmp_path: Path
) -> None:
    """A rank killed while its local save is sent to its partner, or while it receives
    its partner's: the other rank fails at once (no hang); then every version of every
    tier and replica verifies (no half-published replica), a restore with h0's tier lost
    finds the step h1's replica proves complete and one with every tier finds step 3,
    each bit-exact on every rank, and the next save is replicated (each checked again)."""
    jobs, root = RankJob(rank_zygotes, tmp_path), tmp_path / "hosts"
    crash = {"action": "crash", "root": str(root), "phase": "replicate", "victim": victim}
    crash.update({"point": point} if isinstance(point, list) else {"after_seconds": point})
    found = jobs.run(crash)
    assert found[victim]["returncode"] == -9, found
    assert [r["sent"] for r in found] == [[8, 1], [8, 1]]  # step 2: 8 blobs sent, 1 linked
    survivor = found[1 - victim]
    assert survivor["returncode"] == 0 and survivor["seconds"] < 20, survivor
    assert survivor["outcome"].startswith("RanksUnreachable: "), survivor  # not a raw gloo error
    assert "was killed, is frozen or is cut off" in survivor["outcome"], survivor

    resumes = [{"wipe": "h0", "want": want, "copy": True}, {"wipe": None, "want": 3}]
    found = jobs.run({"action": "verify", "root": str(root), "resumes": resumes})
    assert_ranks_ok(found)
    held = found[1]["held"]["h0"]  # h1's replica of h0 (a kill before its pruning: 3 steps)
    assert held in ([3, 2], [2, 1], [3, 2, 1]), held
    published = 3 in held
    assert found[0]["resumes"][0]["step"] == (3 if published else 2)
    if want is not None:
        assert published == (want == 3), held
    assert [r["held"]["own"] for r in found] == [[3, 2], [3, 2]]


@pytest.mark.parametrize(
    ("victim", "point", "own"), RECOVER_POINTS, ids=replica_ids(RECOVER_POINTS)
)
def test_a_recovery_from_a_peer_killed_at(
    victim: int, point: Any, own: list[int], rank_zygotes: Any, tmp_path: Path
) -> None:
    """A rank killed while a replaced host's save is sent back to it: the next restore
    (whatever h0 kept of the transfer) still finds step 3, bit-exact, and the next save
    is replicated."""
    jobs, root = RankJob(rank_zygotes, tmp_path), tmp_path / "hosts"
    crash = {"action": "crash", "root": str(root), "phase": "recover", "victim": victim}
    found = jobs.run({**crash, "point": point, "lost": "h0"})
    assert found[victim]["returncode"] == -9, found
    survivor = found[1 - victim]
    assert survivor["returncode"] == 0 and survivor["seconds"] < 20, survivor
    # not "no local restore" (the bucket next): the ranks can no longer agree on anything
    assert survivor["outcome"].startswith("RanksUnreachable: "), survivor

    found = jobs.run({"action": "verify", "root": str(root), "resumes": [{"want": 3}]})
    assert_ranks_ok(found)
    assert found[0]["held"]["own"] == own and found[1]["held"]["h0"] == [3, 2], found


def test_a_frozen_partner_fails_the_transfer_on_time(rank_zygotes: Any, tmp_path: Path) -> None:
    """A receiver frozen (SIGSTOP) mid-way through the blobs: the sender fails within the
    group's timeout (3 s) with RanksUnreachable naming the frozen rank, not after the
    default half hour; once the frozen rank is killed, the tiers restore as after a kill."""
    jobs, root = RankJob(rank_zygotes, tmp_path), tmp_path / "hosts"
    crash = {"action": "crash", "root": str(root), "phase": "replicate", "victim": 1}
    crash.update({"point": ["blob_received", 2, "after"], "signal": "SIGSTOP", "timeout": 3})
    found = jobs.run(crash, frozen=1)
    assert found[1]["returncode"] == -9 and found[1]["in_time"], found
    sender = found[0]
    assert sender["returncode"] == 0 and 2.5 < sender["seconds"] < 15, sender
    assert re.match(
        r"RanksUnreachable: (receiving from|sending to) rank 1 failed", sender["outcome"]
    )
    assert "DistributedOptions(timeout=...)" in sender["outcome"], sender

    resumes = [{"wipe": "h0", "want": 2, "copy": True}, {"wipe": None, "want": 3}]
    assert_ranks_ok(jobs.run({"action": "verify", "root": str(root), "resumes": resumes}))


def test_a_frozen_host_fails_the_save_on_time_and_its_local_save_is_kept(
    rank_zygotes: Any, tmp_path: Path
) -> None:
    """A manager on two hosts (h0: ranks 0 and 1; h1: rank 2), h1 frozen while step 4 --
    a bucket save -- is replicated: ranks 0 and 1 (which does not take part in the
    transfer) raise RanksUnreachable from step() within DistributedOptions(timeout=5), not
    after the default half hour; the bucket keeps step 2 as head, and the job restarted
    (h1 killed) resumes step 4 from the local tiers, bit-exact, and saves on."""
    jobs, root = RankJob(rank_zygotes, tmp_path), str(tmp_path / "hosts")
    run = {"action": "manager", "root": root, "world": 3, "per_host": 2, "timeout": 5}
    frozen = {"victim": 2, "point": ["manifest", 1, "after"], "signal": "SIGSTOP"}
    found = jobs.run({**run, **frozen, "steps": 4}, frozen=2)
    assert found[2]["returncode"] == -9, found
    for rank in (0, 1):
        record = found[rank]
        assert record["returncode"] == 0 and record["resumed"] == 0, record
        assert record["raised"] == "RanksUnreachable", record
        assert 4.5 < record["seconds"] < 9, record  # one timeout, not one per collective
    assert found[0]["local"] == [4, 3]  # the local save of step 4 landed before the transfer
    assert found[0]["bucket"] == [2]

    found = jobs.run({**run, "steps": 2})
    assert_ranks_ok(found)
    assert [r["resumed"] for r in found] == [4, 4, 4]
    assert [r["outcome"] for r in found] == ["finished"] * 3
    assert found[0]["bucket"] == [2, 6] and found[0]["local"] == [6, 5]
