"""Peer replicas of the local tier in a real multi-rank job, run by torchrun (gloo, CPU)
from test_replicas.py. Each "host" is a directory of its own under ROOT.

Usage: torchrun --nproc_per_node=N child_replicas.py SCENARIO ROOT RANKS_PER_HOST
Each rank checks its own results and exits non-zero on any failure; rank 0 prints one
JSON line of findings.
"""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from assertions import assert_state_equal, clone

from cloudckpt import LocalTier, TransferOptions
from cloudckpt.distributed import Group
from cloudckpt.errors import RanksFailed
from cloudckpt.testing.gpt import GPT, GPTConfig
from cloudckpt.tiers.local import BucketHead, HostTier, TierRecord, run_versions
from cloudckpt.tiers.replicas import HostMap, recover, replicate
from cloudckpt.versions import Version

URI, BRANCH, HEAD = "s3://bucket/run", "main", "head-1"
# Small chunks: many blobs and packs per version.
TRANSFER = TransferOptions(compress=False, chunk_size=64 * 1024, pack_below=8 * 1024)


class Job:
    def __init__(self, root: str, per_host: int) -> None:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        self.group = Group.detect(timeout=60)
        self.rank, self.root = self.group.rank, Path(root)
        self.host = f"h{self.rank // per_host}"
        self.hosts = HostMap.gather(self.group, self.host)
        self.leader = self.hosts.is_leader(self.rank)
        torch.manual_seed(0)  # replicated state: the same on every rank
        self.model = GPT(GPTConfig(n_layer=2, n_embd=64))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def tier(self, host: str | None = None) -> HostTier:
        host = host or self.host
        return HostTier(
            LocalTier(str(self.root / host), keep=2, host=host, transfer=TRANSFER), URI, BRANCH
        )

    def train(self, step: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(step)  # the same data on every rank
        tokens = torch.randint(0, 256, (2, 17), generator=g)
        self.opt.zero_grad()
        self.model(tokens[:, :-1], tokens[:, 1:]).backward()
        self.opt.step()
        return self.state()

    def state(self) -> dict[str, Any]:
        """The replicated model and optimizer, and a part of this host's own."""
        own = torch.full((1000,), float(self.hosts.hosts.index(self.host)))
        return clone(
            {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "own": own}
        )

    def save(self, step: int, head: str | None = HEAD) -> Any:
        """A local save on every host, replicated to its partner."""
        tier = self.tier()
        version = (
            tier.commit(self.state(), step, {}, {}, TierRecord(self.host, head))
            if self.leader
            else None
        )
        return replicate(self.group, self.hosts, tier, version)

    def replace(self, host: str) -> None:
        """``host`` is replaced: its local directory is gone."""
        self.group.barrier()
        if self.host == host and self.leader:
            shutil.rmtree(self.tier().root)
        self.group.barrier()

    def restored(self, version: Any) -> dict[str, Any]:
        """What a fresh model and optimizer hold once ``version`` is loaded into them."""
        torch.manual_seed(99)
        model = GPT(GPTConfig(n_layer=2, n_embd=64))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loaded = self.tier().repo.load(version.id, into={"model": model, "optimizer": opt})
        return clone(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "own": loaded["own"]}
        )

    def same_everywhere(self, value: Any) -> Any:
        values = self.group.all_gather_json(value)
        assert all(v == values[0] for v in values), values
        return values[0]


def steps(tier: HostTier, host: str | None) -> list[int | None]:
    """The steps of the replicas of ``host`` that ``tier``'s host keeps, newest first."""
    assert host is not None
    return [v.step for v in run_versions(tier.replica(host), BRANCH)]


def replaced(job: Job) -> dict[str, Any]:
    """Replicate three saves (the third unchanged), replace the last host, recover."""
    found: dict[str, Any] = {"hosts": list(job.hosts.hosts)}
    job.train(1)
    first = job.save(1)
    job.train(2)
    second = job.save(2)
    expected = job.state()
    third = job.save(3)  # nothing changed since step 2
    if job.leader:
        assert first.blobs_sent > 0 and second.bytes_sent > 0, (first, second)
        # the replicated model and optimizer are on the partner already: not sent
        assert first.blobs_linked > first.blobs_sent, first
        assert third.bytes_sent == 0 and third.blobs_sent == 0, third
        source = job.hosts.replicated_by(job.host)
        assert steps(job.tier(), source) == [3, 2]  # keep=2 replicas of its peer
    found["sent"] = job.group.all_gather_json(
        [first.bytes_sent, second.bytes_sent, third.bytes_sent]
    )
    lost = job.hosts.hosts[-1]
    job.replace(lost)
    report = recover(job.group, job.hosts, job.tier(), BucketHead(HEAD))
    assert report.target is not None, report.reason
    assert job.same_everywhere(report.step) == 3
    assert_state_equal(expected, job.restored(report.target))
    assert report.target.meta["tier"] == {
        "host": report.target.meta["tier"]["host"],
        "bucket_head": HEAD,
        "fence": None,
        "generation": 0,
    }
    if job.host == lost:
        assert report.target.meta["tier"]["host"] == lost  # its own save, from its replica
        if job.leader:  # the state once; of its peer's replica, only the peer's own part
            assert 0 < report.bytes_received < 1.2 * report.target.logical_bytes, report
        # and it keeps its peer's replica again
        assert 3 in steps(job.tier(), job.hosts.replicated_by(lost))
    assert 3 in steps(job.tier(job.hosts.partner(lost)), lost)
    found["received"] = job.group.all_gather_json(report.bytes_received)
    found["transfers"] = report.transfers
    return found


def corrupt(job: Job) -> dict[str, Any]:
    """A save one host cannot send fails on every rank (none left waiting); a damaged blob
    in the replica of a replaced host means no local restore, on every rank."""
    job.train(1)
    job.save(1)
    bogus = Version(id="20260101T000000000Z-0badf00d", branch=BRANCH, step=2)
    sending = bogus if job.leader and job.host == job.hosts.hosts[-1] else None
    try:
        replicate(job.group, job.hosts, job.tier(), sending)
        raise AssertionError("a version that is not there was replicated")
    except RanksFailed as e:
        failed = job.same_everywhere(str(e))
    lost = job.hosts.hosts[-1]
    holder = job.hosts.partner(lost)
    job.replace(lost)
    if job.host == holder and job.leader:
        blobs = sorted(
            (Path(job.tier().replica(lost).store.uri.removeprefix("file://")) / "blobs").rglob("*")
        )
        victim = max((b for b in blobs if b.is_file()), key=lambda b: b.stat().st_size)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x40
        victim.write_bytes(bytes(data))
    job.group.barrier()
    report = recover(job.group, job.hosts, job.tier(), BucketHead(HEAD))
    assert report.target is None
    reason = job.same_everywhere(report.reason)
    if job.host == lost:
        assert job.tier().versions() == []  # nothing published from the damaged transfer
    return {"reason": reason, "failed": failed}


def stale(job: Job) -> dict[str, Any]:
    """A host whose own tier is based on another bucket head restores from its replica;
    with no version on the head at all, no local restore."""
    job.train(1)
    job.save(1)
    expected = job.state()
    lost = job.hosts.hosts[-1]
    job.replace(lost)
    job.train(2)
    if job.host == lost and job.leader:  # a newer save, but on a bucket head since replaced
        job.tier().commit(job.state(), 5, {}, {}, TierRecord(job.host, "old-head"))
    job.group.barrier()
    report = recover(job.group, job.hosts, job.tier(), BucketHead(HEAD))
    assert report.target is not None, report.reason
    assert job.same_everywhere(report.step) == 1
    assert_state_equal(expected, job.restored(report.target))
    elsewhere = recover(job.group, job.hosts, job.tier(), BucketHead("old-head"))
    assert elsewhere.target is None
    return {"reason": job.same_everywhere(elsewhere.reason)}


def main() -> None:
    scenario, root, per_host = sys.argv[1], sys.argv[2], int(sys.argv[3])
    job = Job(root, per_host)
    found = {"replaced": replaced, "corrupt": corrupt, "stale": stale}[scenario](job)
    job.group.barrier()
    if job.rank == 0:
        print(json.dumps(found), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
