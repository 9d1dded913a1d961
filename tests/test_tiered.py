"""The local tier (tiered.py, tiers/local.py, tiers/copy.py) with a bucket on a real S3
server (SeaweedFS) and a real model and optimizer: local saves every step, bucket saves
uploaded from the tier, restore across tiers (newest local first, never a stale lineage,
falling back tier by tier past damaged copies), async saves, the final preemption save,
retention on each tier, and copying a version between repositories."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from assertions import assert_state_equal

from cloudckpt import (
    CheckpointManager,
    HealthCheck,
    Repo,
    RepoOptions,
    Resumed,
    TransferOptions,
    codec,
)
from cloudckpt.background import SaveJob
from cloudckpt.blobs import blob_key, iter_chunks
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.preemption import Notice, PreemptionWatcher
from cloudckpt.tiers.copy import copy_version
from cloudckpt.tiers.local import HostTier, LocalTier
from cloudckpt.versions import Version


@pytest.fixture
def s3(seaweedfs: Any) -> tuple[str, dict[str, Any]]:
    return seaweedfs.fresh_uri("tiered"), seaweedfs.storage_options()


class Trainer:
    """A small real model and optimizer; ``train()`` runs one real step."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
        )
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-2)

    def train(self) -> float:
        x = torch.randn(16, 32)
        loss = ((self.model(x) - x.sum(1, keepdim=True)) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def objects(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.opt}

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.opt.state_dict()})

    def assert_at(self, want: dict[str, Any]) -> None:
        assert_state_equal(want["model"], self.model.state_dict())
        assert_state_equal(want["optimizer"], self.opt.state_dict())


def manager(s3: Any, path: Any, host: str = "h0", **kwargs: Any) -> CheckpointManager:
    uri, opts = s3
    tier = kwargs.pop("tier", None) or LocalTier(str(path), every_steps=1, host=host)
    kwargs.setdefault("save_every_steps", 4)
    return CheckpointManager(uri, opts, local=tier, health=HealthCheck(spike_factor=1e9), **kwargs)


def trained(
    s3: Any, path: Any, until: int, **kwargs: Any
) -> tuple[CheckpointManager, Trainer, dict[int, Any]]:
    """A fresh run on the tier at ``path`` (see :func:`manager`) trained and stepped to
    ``until``: its manager (left open), its trainer and the state after each step."""
    t, snaps = Trainer(), {}
    mgr = manager(s3, path, **kwargs)
    mgr.restore(**t.objects())
    run(mgr, t, until, snaps)
    return mgr, t, snaps


def resume(
    s3: Any, path: Any, step: int, want: dict[str, Any], seed: int, **kwargs: Any
) -> tuple[CheckpointManager, Trainer, Resumed]:
    """A new manager (a restarted process) on the tier at ``path`` resumes ``step``, its
    model and optimizer exactly ``want``: the manager (left open), its trainer and what
    its restore returned."""
    t = Trainer(seed=seed)
    mgr = manager(s3, path, **kwargs)
    start = mgr.restore(**t.objects())
    assert start.step == step
    t.assert_at(want)
    return mgr, t, start


def assert_restart_resumes(
    s3: Any, path: Any, step: int, want: dict[str, Any], seed: int, **kwargs: Any
) -> Resumed:
    """:func:`resume`, then the manager closed; what its restore returned."""
    mgr, _, start = resume(s3, path, step, want, seed, **kwargs)
    mgr.close()
    return start


def run(
    mgr: CheckpointManager, t: Trainer, until: int, snaps: dict[int, Any] | None = None
) -> list[Any]:
    """Train and step from the manager's step to ``until``; the StepResults."""
    results = []
    for step in range(mgr.step_count + 1, until + 1):
        loss = t.train()
        if snaps is not None:
            snaps[step] = t.snapshot()
        results.append(mgr.step(step, metrics={"loss": loss}))
    return results


def bucket_steps(s3: Any) -> list[int | None]:
    uri, opts = s3
    return [v.step for v in Repo(uri, opts).versions()]


def local_steps(mgr: CheckpointManager) -> list[int | None]:
    assert mgr.tiers is not None
    return [v.step for v in mgr.tiers.host.versions()]


def only_blobs_of(host: HostTier, version: Version, others: list[Version]) -> list[str]:
    """The blobs of ``version`` no other of ``others`` uses, largest first."""

    def blobs(v: Version) -> dict[str, int]:
        return {c.digest: c.blob_size for e in host.manifest(v).tensors for c in iter_chunks(e)}

    mine = blobs(version)
    shared = {d for v in others if v.id != version.id for d in blobs(v)}
    return sorted((d for d in mine if d not in shared), key=lambda d: -mine[d])


def flip_blob(host: HostTier, digest: str) -> None:
    path = Path(host.root) / blob_key(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_local_saves_every_step_and_bucket_saves_upload_from_the_tier(s3, tmp_path) -> None:
    t, snaps = Trainer(), {}
    mgr = manager(s3, tmp_path / "tier")
    assert mgr.restore(**t.objects()).fresh
    assert mgr.tiers is not None
    served: list[str] = []
    source = mgr.tiers.host.source

    def spied() -> Any:
        read = source()

        def raw(digest: str, size: int) -> Any:
            served.append(digest)
            return read(digest, size)

        return raw

    mgr.tiers.host.source = spied  # type: ignore[method-assign]

    def no_second_snapshot(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a bucket save committed the state again instead of uploading")

    mgr.repo.commit = no_second_snapshot  # type: ignore[method-assign]
    uploaded_from: dict[int, str] = {}
    tiers = []
    for step in range(1, 9):
        (result,) = run(mgr, t, step, snaps)
        assert result.saved is not None
        tiers.append(result.saved.tier)
        if result.saved.tier == "bucket":
            uploaded_from[result.step] = mgr.tiers.host.versions()[0].id
            assert mgr.tiers.host.versions()[0].step == result.step
    assert tiers == ["local"] * 3 + ["bucket"] + ["local"] * 3 + ["bucket"]
    uri, opts = s3
    bucket = Repo(uri, opts)
    versions = bucket.versions()
    assert [v.step for v in versions] == [4, 8]
    for v in versions:
        assert v.meta["tier"] == {"host": "h0", "local": uploaded_from[v.step]}
        assert_state_equal(snaps[v.step]["model"], bucket.load(v.id)["model"])
        assert bucket.verify(v.id).ok
    every = {c.digest for v in versions for e in bucket.manifest(v).tensors for c in iter_chunks(e)}
    assert set(served) == every, "every blob the bucket got was read from the local tier"
    assert len(served) == len(every), "and each only once"
    local_ids = {v.id for v in mgr.tiers.host.versions()}
    assert local_ids.isdisjoint(bucket.index().versions), "local versions stay local"
    assert local_steps(mgr) == [8, 7]
    mgr.close()


def test_a_local_only_version_is_never_visible_in_the_bucket(s3, tmp_path) -> None:
    mgr, _, _ = trained(s3, tmp_path / "tier", 3)
    uri, opts = s3
    assert Repo(uri, opts).versions() == []
    assert local_steps(mgr) == [3, 2]
    assert mgr.last_save is None and mgr.committed_step is None
    mgr.close()


def test_restart_resumes_the_newest_local_step_and_another_host_the_buckets(s3, tmp_path) -> None:
    mgr, _, snaps = trained(s3, tmp_path / "h0", 6)
    newest_local = mgr.tiers.host.versions()[0]
    mgr.close()

    mgr, again, start = resume(s3, tmp_path / "h0", 6, snaps[6], seed=1)
    assert mgr.step_count == 6
    assert start.version is not None and start.version.id == newest_local.id
    assert mgr.committed_step == 4, "the bucket holds step 4"
    run(mgr, again, 8, snaps)  # the run goes on: the next bucket save lands on step 4
    assert bucket_steps(s3) == [4, 8]
    mgr.close()

    # another host: its own (empty) local tier
    mgr, _, start = resume(s3, tmp_path / "h1", 8, snaps[8], seed=2, host="h1")
    assert mgr.step_count == 8
    assert start.version is not None and start.version.id == mgr.repo.resolve("main").id
    mgr.close()


def test_a_stale_local_lineage_is_not_taken(s3, tmp_path) -> None:
    h0, _, snaps0 = trained(s3, tmp_path / "h0", 6)  # local to step 6 over bucket step 4
    h0.close()

    # the bucket's newest, not h0's step 6
    h1, t1, _ = resume(s3, tmp_path / "h1", 4, snaps0[4], seed=9, host="h1")
    snaps1: dict[int, Any] = {}
    run(h1, t1, 8, snaps1)
    assert bucket_steps(s3) == [4, 8]
    h1.close()

    # h0's own step 6 is on a lineage the bucket left
    h0, back, _ = resume(s3, tmp_path / "h0", 8, snaps1[8], seed=10)
    snaps: dict[int, Any] = {}
    run(h0, back, 9, snaps)  # its next local save is on top of step 8
    h0.close()
    assert_restart_resumes(s3, tmp_path / "h0", 9, snaps[9], seed=11)


def test_a_save_after_resuming_below_a_stale_local_step_is_kept(s3, tmp_path) -> None:
    """keep=1 and a stale local version at a higher step than the run resumed at: the
    pruning after the next local save must drop the stale one, not the save just made."""
    tier0 = LocalTier(str(tmp_path / "h0"), every_steps=1, keep=1, host="h0")
    h0, _, _ = trained(s3, None, 7, tier=tier0)  # bucket step 4, local step 7 (keep=1)
    h0.close()
    t1 = Trainer(seed=1)
    h1 = manager(s3, tmp_path / "h1", host="h1")
    assert h1.restore(**t1.objects()).step == 4
    run(h1, t1, 5)
    h1.save("manual")  # bucket step 5
    h1.close()

    t2, snaps = Trainer(seed=2), {}
    h0 = manager(s3, None, tier=tier0)
    assert h0.restore(**t2.objects()).step == 5
    run(h0, t2, 6, snaps)  # a local save of step 6 on top of bucket step 5
    assert local_steps(h0) == [6]
    report = h0.save("manual")  # a bucket save of step 6, uploaded from the tier
    assert report is not None and report.version.step == 6
    assert h0.repo.resolve("main").meta["tier"]["local"] == h0.tiers.host.versions()[0].id
    h0.close()
    assert_restart_resumes(s3, None, 6, snaps[6], seed=3, tier=tier0)


def test_a_damaged_local_copy_falls_back_to_the_next_version(s3, tmp_path) -> None:
    mgr, _, snaps = trained(s3, tmp_path / "h0", 6)  # bucket 4; local 6 and 5
    host = mgr.tiers.host
    local6, local5 = host.versions()
    flip_blob(host, only_blobs_of(host, local6, [local5])[0])
    mgr.close()

    start = assert_restart_resumes(s3, tmp_path / "h0", 5, snaps[5], seed=1)
    assert list(start.skipped) == [f"local:{local6.id}"]

    flip_blob(host, only_blobs_of(host, local5, [local6])[0])  # both local copies bad
    mgr, third, start = resume(s3, tmp_path / "h0", 4, snaps[4], seed=2)  # the bucket's
    assert set(start.skipped) == {f"local:{local6.id}", f"local:{local5.id}"}
    run(mgr, third, 5)  # and the run goes on
    mgr.close()


def test_a_damaged_local_copy_of_a_bucket_version_is_read_from_the_bucket(s3, tmp_path) -> None:
    tier = LocalTier(str(tmp_path / "h0"), every_steps=1, keep=3, host="h0")
    mgr, _, snaps = trained(s3, None, 4, tier=tier)
    host = mgr.tiers.host
    uploaded = mgr.repo.resolve("main")
    (local4,) = (v for v in host.versions() if v.id == uploaded.meta["tier"]["local"])
    flip_blob(host, only_blobs_of(host, local4, host.versions())[0])
    mgr.close()
    start = assert_restart_resumes(s3, None, 4, snaps[4], seed=1, tier=tier)
    assert start.version is not None and start.version.id == uploaded.id


def index_reads(repo: Repo) -> list[str]:
    """The reads of ``repo``'s ``versions.json`` from here on (filled as they happen)."""
    reads: list[str] = []
    read = repo.store.read_versioned

    def spied(key: str) -> Any:
        if key == "versions.json":
            reads.append(key)
        return read(key)

    repo.store.read_versioned = spied  # type: ignore[method-assign]
    return reads


def test_a_restore_reads_the_local_tiers_index_once(s3, tmp_path) -> None:
    """However many local versions it weighs and loads. Here local step 8 (bucket step 8
    was uploaded from it: taken by its content) is damaged, local step 7 is on the older
    head, and the bucket's lineage tries local step 8 again as its copy of bucket step 8
    before the bucket serves."""
    mgr, _, snaps = trained(s3, tmp_path / "h0", 8)  # bucket 4, 8 (from local 8); local 8, 7
    host = mgr.tiers.host
    local8, local7 = host.versions()
    flip_blob(host, only_blobs_of(host, local8, [local7])[0])
    mgr.close()
    again = Trainer(seed=1)
    mgr = manager(s3, tmp_path / "h0")
    reads = index_reads(mgr.tiers.host.repo)
    start = mgr.restore(**again.objects())
    assert start.step == 8 and start.version == mgr.repo.resolve("main")
    assert list(start.skipped) == [f"local:{local8.id}"]
    again.assert_at(snaps[8])
    assert reads == ["versions.json"]
    mgr.close()


def test_a_damaged_local_copy_at_upload_time_uploads_from_memory(s3, tmp_path) -> None:
    t, snaps = Trainer(), {}
    mgr = manager(s3, tmp_path / "h0")
    mgr.restore(**t.objects())
    host = mgr.tiers.host
    commit = host.commit

    def commit_then_damage(state: Any, step: int, *args: Any) -> Version:
        version = commit(state, step, *args)
        if step == 4:
            flip_blob(host, only_blobs_of(host, version, [])[0])
        return version

    host.commit = commit_then_damage  # type: ignore[method-assign]
    results = run(mgr, t, 4, snaps)
    assert results[-1].saved is not None and results[-1].saved.tier == "bucket"
    uri, opts = s3
    bucket = Repo(uri, opts)
    head = bucket.resolve("main")
    assert head.step == 4 and head.meta["tier"] == {"host": "h0"}, "not from the local copy"
    assert bucket.verify(head.id).ok
    state = bucket.load(head.id)
    assert_state_equal(snaps[4]["model"], state["model"])
    assert_state_equal(snaps[4]["optimizer"], state["optimizer"])
    mgr.close()


def test_async_saves_with_a_local_tier(s3, tmp_path) -> None:
    t, snaps = Trainer(), {}
    mgr = manager(s3, tmp_path / "h0", async_save=True)
    mgr.restore(**t.objects())
    results = []
    for step in range(1, 9):  # steps slower than the saves: each one lands
        results += run(mgr, t, step, snaps)
        mgr.wait()
    assert all(r.saved is None for r in results), "async: nothing is committed in step()"
    assert all(r.saving for r in results)
    report = mgr.last_save
    assert report is not None and report.tier == "bucket" and report.version.step == 8
    assert 0 <= report.blocked_seconds <= report.seconds
    local = mgr._saves.last_local_save
    assert local is not None and local.tier == "local" and local.version.step == 7
    assert local.blocked_seconds <= local.seconds
    assert bucket_steps(s3) == [4, 8]
    uri, opts = s3
    bucket = Repo(uri, opts)
    for v in bucket.versions():
        assert_state_equal(snaps[v.step]["model"], bucket.load(v.id)["model"])
    assert local_steps(mgr) == [8, 7]
    mgr.close()
    assert_restart_resumes(s3, tmp_path / "h0", 8, snaps[8], seed=4, async_save=True)


def test_the_final_preemption_save_goes_to_the_bucket(s3, tmp_path) -> None:
    watcher = PreemptionWatcher(signals=())
    mgr, t, snaps = trained(s3, tmp_path / "h0", 5, preemption=watcher)
    watcher.trigger(Notice("test", time.monotonic() + 30))
    (result,) = run(mgr, t, 6, snaps)
    assert result.preempted and result.saved is not None and result.saved.tier == "bucket"
    uri, opts = s3
    head = Repo(uri, opts).resolve("main")
    assert head.step == 6 and head.meta["reason"] == "preemption (test)"
    assert head.meta["tier"]["local"] == mgr.tiers.host.versions()[0].id
    mgr.close()
    assert_restart_resumes(s3, tmp_path / "h1", 6, snaps[6], seed=1, host="h1")


def test_retention_prunes_only_bucket_versions(s3, tmp_path) -> None:
    tier = LocalTier(str(tmp_path / "h0"), every_steps=1, keep=3, host="h0")
    mgr, _, _ = trained(s3, None, 8, tier=tier, keep_last=1, gc_every=1, gc_grace=0)
    assert bucket_steps(s3) == [8]
    assert local_steps(mgr) == [8, 7, 6], "the local tier keeps its own count"
    mgr.close()


def test_local_tier_keep_bounds_the_local_versions_and_their_data(s3, tmp_path) -> None:
    tier = LocalTier(str(tmp_path / "h0"), every_steps=1, keep=3, host="h0")
    mgr, _, _ = trained(s3, None, 10, tier=tier, save_every_steps=100)
    assert local_steps(mgr) == [10, 9, 8]
    host = mgr.tiers.host
    referenced = {
        blob_key(c.digest)
        for v in host.versions()
        for e in host.manifest(v).tensors
        for c in iter_chunks(e)
    }
    assert set(host.repo.store.list_keys("blobs")) == referenced, "pruned data went at once"
    for v in host.versions():
        assert host.repo.verify(v.id).ok
    mgr.close()


def test_every_steps_spaces_the_local_saves(s3, tmp_path) -> None:
    t = Trainer()
    tier = LocalTier(str(tmp_path / "h0"), every_steps=2, keep=10, host="h0")
    mgr = manager(s3, None, tier=tier)
    mgr.restore(**t.objects())
    saved = [(r.step, r.saved.tier if r.saved else None) for r in run(mgr, t, 8)]
    assert saved == [
        (1, None), (2, "local"), (3, None), (4, "bucket"),
        (5, None), (6, "local"), (7, None), (8, "bucket"),
    ]  # fmt: skip
    mgr.close()


# -- copy_version ------------------------------------------------------------------------
def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "shared": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(99)),
        "w": torch.randn(64 * 1024, generator=g),
        "b": torch.randn(100, generator=g),
        "step": seed,
    }


CHUNKS = RepoOptions(transfer=TransferOptions(chunk_size=64 * 1024, workers=2))


def _source_repo(tmp_path: Any, state: dict[str, Any]) -> tuple[Repo, Version]:
    src = Repo(
        f"file://{tmp_path}/src",
        options=RepoOptions(transfer=TransferOptions(chunk_size=64 * 1024, compress=False)),
    )
    return src, src.commit(state, step=state["step"])


def _reading(src: Repo, log: list[str]) -> Any:
    from cloudckpt.blobs import BlobReader

    read = BlobReader(src.store, src.options.transfer).raw

    def source(digest: str, size: int) -> Any:
        log.append(digest)
        return read(digest, size)

    return source


def test_copy_version_uploads_only_the_blobs_the_destination_lacks(s3, tmp_path) -> None:
    uri, opts = s3
    dst = Repo(uri, opts, options=CHUNKS)
    dst.commit(_state(1), branch="other", step=1)  # holds "shared", not as the parent
    parent = dst.commit(_state(2), step=2)
    src, version = _source_repo(tmp_path, {**_state(2), "w": _state(3)["w"], "step": 3})
    doc = src.manifest(version)
    wanted = {c.digest for e in doc.tensors for c in iter_chunks(e)}
    held = {
        c.digest for v in dst.versions() for e in dst.manifest(v).tensors for c in iter_chunks(e)
    }
    read: list[str] = []
    copied = copy_version(_reading(src, read), doc, dst, "main", meta={"copied": True})
    assert sorted(read) == sorted(wanted - held)
    assert dst.last_stats.transferred_blobs == len(wanted - held) > 0
    assert dst.last_stats.reused_blobs == len(wanted & held) > 0
    assert copied.parent == parent.id and copied.step == 3 and copied.meta["copied"] is True
    assert dst.verify(copied.id).ok
    assert_state_equal(src.load(version.id), dst.load(copied.id))


def test_copy_version_skips_blobs_stored_outside_the_parent(s3, tmp_path) -> None:
    uri, opts = s3
    dst = Repo(uri, opts, options=CHUNKS)
    dst.commit(_state(1), branch="other", step=1)
    src, version = _source_repo(tmp_path, _state(1))
    read: list[str] = []
    copied = copy_version(_reading(src, read), src.manifest(version), dst, "main")
    assert read == [] and dst.last_stats.transferred_blobs == 0
    assert_state_equal(src.load(version.id), dst.load(copied.id))


def _liar(src: Repo, victim: str) -> Any:
    read = _reading(src, [])

    def source(digest: str, size: int) -> Any:
        raw = np.array(read(digest, size), copy=True)
        if digest == victim:
            raw[len(raw) // 2] ^= 1
        return raw

    return source


def test_copy_version_refuses_wrong_bytes_and_publishes_nothing(s3, tmp_path) -> None:
    uri, opts = s3
    dst = Repo(uri, opts, options=CHUNKS)
    first = dst.commit(_state(1), step=1)
    src, version = _source_repo(tmp_path, _state(2))
    doc = src.manifest(version)
    victim = next(c.digest for e in doc.tensors for c in iter_chunks(e) if e["path"] == "w")
    with pytest.raises(CorruptCheckpoint):
        copy_version(_liar(src, victim), doc, dst, "main")
    assert [v.id for v in Repo(uri, opts).versions()] == [first.id]
    assert dst.store.stat(blob_key(victim)) is None, "the wrong bytes were not stored"
    assert dst.verify(first.id).ok


def _tier_version(tmp_path: Any, state: dict[str, Any]) -> tuple[HostTier, Version]:
    """A local save of ``state`` in a tier of small chunks."""
    from cloudckpt.tiers.local import TierRecord

    small = TransferOptions(chunk_size=64 * 1024, compress=False)
    host = HostTier(LocalTier(str(tmp_path / "tier"), transfer=small), "memory://x", "main")
    return host, host.commit(state, state["step"], {}, {}, TierRecord("h0", None))


def test_an_upload_from_the_tier_hashes_each_blob_it_stores_once(tmp_path, monkeypatch) -> None:
    host, version = _tier_version(tmp_path, _state(2))
    doc = host.manifest(version)
    hashed: list[str] = []
    content_hash = codec.content_hash

    def counting(raw: Any) -> str:
        hashed.append(content_hash(raw))
        return hashed[-1]

    monkeypatch.setattr(codec, "content_hash", counting)
    dst = Repo(f"memory://tiered/{tmp_path.name}", options=CHUNKS)
    copied = copy_version(host.source(), doc, dst, "main")
    blobs = {c.digest for e in doc.tensors for c in iter_chunks(e)}
    assert sorted(d for d in hashed if d in blobs) == sorted(blobs), "each exactly once"
    monkeypatch.undo()
    assert dst.verify(copied.id).ok


def test_a_tier_blob_flipped_on_disk_is_caught_on_upload_and_nothing_is_stored(
    s3, tmp_path
) -> None:
    uri, opts = s3
    host, version = _tier_version(tmp_path, _state(2))
    doc = host.manifest(version)
    victim = next(c.digest for e in doc.tensors for c in iter_chunks(e) if e["path"] == "w")
    flip_blob(host, victim)
    dst = Repo(uri, opts, options=CHUNKS)
    with pytest.raises(CorruptCheckpoint, match=f"blob {victim} from the tier fails its hash"):
        copy_version(host.source(), doc, dst, "main", origin="the tier")
    assert Repo(uri, opts).versions() == []
    assert dst.store.stat(blob_key(victim)) is None, "the flipped bytes were not stored"


def test_copy_version_checks_the_size_of_what_the_source_gives(s3, tmp_path) -> None:
    uri, opts = s3
    dst = Repo(uri, opts, options=CHUNKS)
    src, version = _source_repo(tmp_path, _state(2))
    doc = src.manifest(version)
    good = _reading(src, [])

    def short(digest: str, size: int) -> Any:
        return good(digest, size)[:-4]

    with pytest.raises(CorruptCheckpoint):
        copy_version(short, doc, dst, "main")
    assert Repo(uri, opts).versions() == []


def test_a_local_tier_stores_blobs_uncompressed(s3, tmp_path) -> None:
    mgr, _, _ = trained(s3, tmp_path / "h0", 1)
    host = mgr.tiers.host
    for entry in host.manifest(host.versions()[0]).tensors:
        for chunk in iter_chunks(entry):
            stored = (Path(host.root) / blob_key(chunk.digest)).read_bytes()
            assert stored[:4] == codec.MAGIC and stored[4] == 0, "codec id 0: raw"
            assert len(stored) >= chunk.blob_size
    mgr.close()


def test_a_local_tier_that_cannot_be_written_does_not_stop_the_run(s3, tmp_path) -> None:
    """The host's disk fails (here: the tier's path lies under a regular file, so every
    local read and write fails): restore and bucket saves go on without the tier, from
    memory; the local-only saves are skipped, not counted as failed saves."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    t, snaps = Trainer(), {}
    mgr = manager(s3, blocker / "tier")
    assert mgr.restore(**t.objects()).fresh
    results = run(mgr, t, 9, snaps)
    assert [r.saved.tier if r.saved else None for r in results] == [
        None, None, None, "bucket", None, None, None, "bucket", None,
    ]  # fmt: skip
    assert all(r.save_error is None for r in results) and mgr.failed_saves == 0
    uri, opts = s3
    bucket = Repo(uri, opts)
    assert [v.step for v in bucket.versions()] == [4, 8]
    assert bucket.resolve("main").meta["tier"] == {"host": "h0"}, "uploaded from memory"
    mgr.close()
    assert_restart_resumes(s3, blocker / "tier", 8, snaps[8], seed=1)


def test_a_local_copy_that_cannot_be_read_is_passed_over(s3, tmp_path) -> None:
    mgr, _, snaps = trained(s3, tmp_path / "h0", 6)
    host = mgr.tiers.host
    local6, local5 = host.versions()
    path = Path(host.root) / blob_key(only_blobs_of(host, local6, [local5])[0])
    path.unlink()
    path.mkdir()  # reading it fails with an OS error, not a hash mismatch
    mgr.close()
    start = assert_restart_resumes(s3, tmp_path / "h0", 5, snaps[5], seed=1)
    assert list(start.skipped) == [f"local:{local6.id}"]


def test_a_restart_after_a_rollback_resumes_the_state_the_run_went_on_from(s3, tmp_path) -> None:
    """The health check rolls the run back to the bucket's step 4 at step 8 (loss NaN);
    the local steps 6-7 of the abandoned lineage are still on disk. A restart right
    after resumes step 4; after the run saved step 5 again, that step 5 -- never the
    abandoned step 7."""
    mgr, t, snaps = trained(s3, tmp_path / "h0", 7)
    t.train()
    result = mgr.step(8, metrics={"loss": float("nan")})
    assert result.rolled_back is not None and result.step == 4
    t.assert_at(snaps[4])
    mgr.close()
    mgr, t, _ = resume(s3, tmp_path / "h0", 4, snaps[4], seed=3)  # not the abandoned step 7
    run(mgr, t, 5, snaps)  # the run goes on from step 4: a local save of step 5
    mgr.close()
    assert_restart_resumes(s3, tmp_path / "h0", 5, snaps[5], seed=1)


@pytest.mark.parametrize("healthy_between", [0, 3])
def test_rollbacks_in_a_row_still_stop_the_run_with_a_local_tier(
    s3, tmp_path, healthy_between
) -> None:
    """Each rollback goes back to the bucket's step 4: local saves in between (the steps
    after it, or the rollback's own) do not end the run of rollbacks, so a run that keeps
    failing stops after ``max_rollbacks`` instead of looping."""
    t = Trainer()
    uri, opts = s3
    mgr = CheckpointManager(
        uri,
        opts,
        save_every_steps=4,
        local=LocalTier(str(tmp_path / "h0"), host="h0"),
        health=HealthCheck(spike_factor=1e9, max_rollbacks=2),
    )
    mgr.restore(**t.objects())
    run(mgr, t, 4)
    with pytest.raises(RuntimeError, match="2 rollbacks in a row"):
        for _ in range(5):  # bounded: the third rollback raises
            run(mgr, t, 4 + healthy_between)
            result = mgr.step(mgr.step_count + 1, metrics={"loss": float("nan")})
            assert result.rolled_back is not None
    mgr.close()


def test_a_bucket_save_is_not_skipped_for_a_local_save_in_flight(s3, tmp_path) -> None:
    """async_save with when_busy="skip": a local-only save still in flight at a bucket
    save point makes the bucket save wait for it, never skip (else a tier slower than
    the steps would keep every save out of the bucket)."""
    t, snaps = Trainer(), {}
    mgr = manager(s3, tmp_path / "h0", async_save=True, when_busy="skip")
    mgr.restore(**t.objects())
    commit = mgr.tiers.host.commit

    def slow_commit(*args: Any) -> Version:
        time.sleep(0.3)  # a slow host disk: each local save outlasts a step
        return commit(*args)

    mgr.tiers.host.commit = slow_commit  # type: ignore[method-assign]
    results = run(mgr, t, 4, snaps)
    assert results[-1].saving, "the bucket save of step 4 started"
    report = mgr.wait()
    assert report is not None and report.version.step == 4 and report.tier == "bucket"
    uri, opts = s3
    assert_state_equal(snaps[4]["model"], Repo(uri, opts).load()["model"])
    mgr.close()


def test_local_saves_do_not_block_training_on_an_upload_in_flight(
    s3, tmp_path, monkeypatch
) -> None:
    """async_save: the bucket save of step 4 uploads in the background (slowly here);
    the local saves of the steps meanwhile are skipped, not waited for, so training never
    waits on the upload."""
    import cloudckpt.tiered

    upload = cloudckpt.tiered.copy_version

    def slow_upload(*args: Any, **kwargs: Any) -> Version:
        time.sleep(1.5)
        return upload(*args, **kwargs)

    monkeypatch.setattr(cloudckpt.tiered, "copy_version", slow_upload)
    t, snaps = Trainer(), {}
    mgr = manager(s3, tmp_path / "h0", async_save=True)
    mgr.restore(**t.objects())
    run(mgr, t, 4, snaps)
    started = time.monotonic()
    (result,) = run(mgr, t, 5, snaps)
    assert time.monotonic() - started < 1.0, "step 5 waited for the upload"
    assert not result.saving and result.saved is None, "its local save was skipped"
    report = mgr.wait()
    assert report is not None and report.version.step == 4
    (result,) = run(mgr, t, 6, snaps)
    assert result.saving, "the next local save runs once the upload is done"
    mgr.wait()
    assert local_steps(mgr)[0] == 6
    mgr.close()


def test_a_frozen_jobs_local_saves_lose_to_the_next_lease_holders(s3, tmp_path) -> None:
    # Job A holds the lease, then is "frozen": B takes the lease over (a new fencing
    # token), resumes and saves locally; A wakes up and saves a local step of its own on
    # the same bucket head -- and prunes the tier to keep=1. B's save survives A's
    # pruning, and the next restore takes it, never A's.
    uri, opts = s3
    tier = LocalTier(str(tmp_path / "h0"), every_steps=1, keep=1, host="h0")
    a_t, snaps = Trainer(), {}
    a = CheckpointManager(uri, opts, local=tier, save_every_steps=2, lease_ttl=60)
    a.restore(**a_t.objects())
    run(a, a_t, 3, snaps)  # bucket 2; local 3
    b_t = Trainer(seed=1)
    b = CheckpointManager(uri, opts, local=tier, save_every_steps=100)
    assert b._writer.lease is not None
    b._writer.lease.acquire(force=True)  # the takeover a frozen holder sleeps through
    b.restore(**b_t.objects())
    assert b.step_count == 3
    run(b, b_t, 5, snaps)  # local 4, 5 under B's token
    b.close()
    a.step_count = 3
    a_t.train()
    a.tiers.commit(
        a_t.snapshot(), SaveJob("zombie", 4, {}, {}, time.perf_counter(), to_bucket=False)
    )
    c_t = Trainer(seed=2)
    c = CheckpointManager(uri, opts, local=tier, save_every_steps=100)
    start = c.restore(**c_t.objects())
    assert start.step == 5
    c_t.assert_at(snaps[5])
    c.close()


def test_a_damaged_tier_index_is_a_failed_disk_not_a_failed_run(s3, tmp_path) -> None:
    mgr, _, snaps = trained(s3, tmp_path / "h0", 5)  # bucket 4, local 5
    index = Path(mgr.tiers.host.root) / "versions.json"
    mgr.close()
    index.write_text('{"format": 2, "versions": [')  # truncated
    mgr, again, _ = resume(s3, tmp_path / "h0", 4, snaps[4], seed=1)  # the bucket's
    run(mgr, again, 8)  # local saves fail (logged), the bucket save at 8 lands
    assert bucket_steps(s3)[-1] == 8
    mgr.close()
