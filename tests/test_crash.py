"""Crash harness: a real process SIGKILLed at 26 points of a commit and of a collection
(on SeaweedFS; on Azurite at 14 of them, the block-blob calls in place of multipart's).

Each time the repository must stay consistent: every visible version verifies, the head
loads bit-exact as one of the states committed, ``gc`` reclaims every orphan (blobs,
manifests, incomplete multipart uploads), and the next commit works.

A manager with a local tier is killed too (on SeaweedFS, at 8 points of a local save and
of an upload from the tier): a restart on the same host resumes the newest step that was
provably complete, every local version verifies and the bucket stays consistent.
"""

from __future__ import annotations

import json
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
