"""Peer replicas of the local tier (cloudckpt.tiers.replicas): the host map, the plan of a
restore, a damaged or aborted transfer in one process, and real torchrun jobs (gloo, CPU)
with several "hosts" on this machine (child_replicas.py asserts on every rank)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from assertions import assert_state_equal
from processes import torchrun

from cloudckpt import LocalTier, Repo, TransferOptions
from cloudckpt.blobs import blob_key
from cloudckpt.distributed import Group
from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.tiers import peer
from cloudckpt.tiers.copy import blobs_of
from cloudckpt.tiers.links import siblings
from cloudckpt.tiers.local import BucketHead, HostTier, TierRecord, run_versions
from cloudckpt.tiers.plan import plan
from cloudckpt.tiers.replicas import HostMap, recover, replicate

HERE = Path(__file__).resolve().parent
CHILD = str(HERE / "child_replicas.py")
TRANSFER = TransferOptions(compress=False, chunk_size=4096, pack_below=1024)


def test_host_map_pairs_each_host_with_the_next_host_in_rank_order() -> None:
    hosts = HostMap(("b", "a", "c"), ("b", "b", "a", "c", "a"))
    assert hosts.leader("a") == 2 and hosts.ranks("a") == [2, 4]
    assert [hosts.is_leader(r) for r in range(5)] == [True, False, True, True, False]
    assert [hosts.partner(h) for h in "bac"] == ["a", "c", "b"]
    assert [hosts.replicated_by(h) for h in "bac"] == ["c", "b", "a"]
    one = HostMap.gather(Group(), "solo")
    assert one.hosts == ("solo",) and one.partner("solo") is None


def _holding(host: str, own: list[int], replicas: dict[str, list[int]]) -> dict[str, Any]:
    listing = {h: [[s, f"{h}@{host}-{s}"] for s in steps] for h, steps in replicas.items()}
    return {
        "host": host,
        "head": "H",
        "own": [[s, f"{host}-{s}"] for s in own],
        "replicas": listing,
    }


def test_the_plan_takes_the_newest_step_every_host_reaches() -> None:
    hosts = HostMap(("a", "b", "c"), ("a", "b", "c"))  # a -> b -> c -> a
    reports = [
        _holding("a", [4, 3], {"c": [4, 3]}),
        _holding("b", [], {}),  # replaced: its replica of a is gone too
        _holding("c", [4, 3], {"b": [3]}),
    ]
    decided = plan(hosts, reports)
    assert decided["target"] == 3  # b reaches only step 3, from c
    assert decided["fetch"] == [[{"src": "c", "dst": "b", "of": "b", "id": "b@c-3", "into": "own"}]]
    assert decided["recreate"] == [
        [{"src": "a", "dst": "b", "of": "a", "id": None, "into": "replica"}]
    ]
    assert decided["own"] == {"a": "a-3", "c": "c-3"}
    reports[2]["replicas"] = {}
    assert plan(hosts, reports) == {"target": None, "reason": "no local version of ['b']"}
    reports[0]["head"] = "other"
    assert plan(hosts, reports)["target"] is None


def test_two_replaced_hosts_are_restored_in_one_round_unless_they_were_partners() -> None:
    hosts = HostMap(("h0", "h1", "h2", "h3"), ("h0", "h1", "h2", "h3"))  # h0 -> h1 -> ...
    reports = [
        _holding("h0", [2], {"h3": [2]}),
        _holding("h1", [], {}),
        _holding("h2", [2], {"h1": [2]}),
        _holding("h3", [], {}),
    ]
    decided = plan(hosts, reports)
    assert decided["target"] == 2 and len(decided["fetch"]) == 1
    assert {(t["src"], t["dst"]) for t in decided["fetch"][0]} == {("h2", "h1"), ("h0", "h3")}
    assert {(t["src"], t["dst"]) for t in decided["recreate"][0]} == {("h0", "h1"), ("h2", "h3")}
    reports = [  # h1 and h2 replaced: h2's replica is on h3, h1's was on h2
        _holding("h0", [2], {"h3": [2]}),
        _holding("h1", [], {}),
        _holding("h2", [], {}),
        _holding("h3", [2], {"h2": [2]}),
    ]
    assert plan(hosts, reports)["reason"] == "no local version of ['h1']"


def _version(tmp_path: Path) -> tuple[HostTier, Any, dict[str, Any]]:
    tier = HostTier(
        LocalTier(str(tmp_path / "src"), host="a", transfer=TRANSFER), "s3://b/r", "main"
    )
    state = {"w": torch.randn(3000), "b": torch.arange(100), "step": 7}
    version = tier.commit(state, 7, {"loss": 1.5}, {"note": "x"}, TierRecord("a", "H"))
    return tier, version, state


class FakeLink(peer.Link):
    """A sender played back from a list of frames; what the receiver sends is kept."""

    def __init__(self, frames: list[tuple[int, torch.Tensor]]) -> None:
        self.peer, self.frames, self.sent = 1, frames, []

    def _send(self, kind: int, payload: torch.Tensor) -> None:
        self.sent.append((kind, bytes(payload.numpy())))

    def recv(self) -> tuple[int, torch.Tensor]:
        return self.frames.pop(0)


def _frames(tier: HostTier, version: Any, damage: int | None = None) -> list[Any]:
    doc = tier.manifest(version)
    frames = [(peer.JSON, peer._bytes(doc.encode()))]
    read = tier.source()
    for i, (digest, blob) in enumerate(blobs_of(doc).items()):
        raw = np.array(read(digest, blob.size))
        if i == damage:
            raw[len(raw) // 2] ^= 1
        frames.append((peer.BLOB, torch.from_numpy(raw)))
    return frames


def test_a_received_version_keeps_its_meta_and_loads_bit_for_bit(tmp_path: Path) -> None:
    tier, version, state = _version(tmp_path)
    dst = Repo(f"file://{tmp_path / 'dst'}")
    link = FakeLink(_frames(tier, version))
    got, moved = peer.receive(link, dst, "main")
    assert got is not None and got.step == 7 and got.meta == version.meta
    assert link.sent[0][0] == peer.JSON and len(json.loads(link.sent[0][1])) == moved.blobs > 1
    assert_state_equal(state, dst.load(got.id))


def test_a_damaged_transfer_raises_and_publishes_nothing(tmp_path: Path) -> None:
    tier, version, _ = _version(tmp_path)
    dst = Repo(f"file://{tmp_path / 'dst'}")
    frames = _frames(tier, version, damage=1)
    with pytest.raises(CorruptCheckpoint, match="fails its hash"):
        peer.receive(FakeLink(frames), dst, "main")
    assert frames == []  # every frame the sender sent was read: the sender is not left waiting
    assert run_versions(dst, "main") == []


def test_a_sender_that_aborts_midway_publishes_nothing(tmp_path: Path) -> None:
    tier, version, _ = _version(tmp_path)
    frames = [*_frames(tier, version)[:2], (peer.ABORT, peer._bytes(b"disk on fire"))]
    with pytest.raises(peer.PeerAborted, match="disk on fire"):
        peer.receive(FakeLink(frames), Repo(f"file://{tmp_path / 'dst'}"), "main")


def test_blobs_this_host_holds_are_linked_not_sent_unless_damaged(tmp_path: Path) -> None:
    tier, version, state = _version(tmp_path)
    frames = _frames(tier, version)
    digests = list(blobs_of(tier.manifest(version)))
    victim = Path(tier.root) / blob_key(digests[1])
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))  # a damaged copy is not linked: it is asked for
    dst = tier.replica("b")
    link = FakeLink([frames[0], frames[2]])
    got, moved = peer.receive(link, dst, "main", siblings(tier, dst))
    assert json.loads(link.sent[0][1]) == [digests[1]] and link.frames == []
    assert (moved.blobs, moved.linked) == (1, len(digests) - 1)
    assert got is not None and got.meta == version.meta
    assert_state_equal(state, dst.load(got.id))


def test_one_host_replicates_nothing_and_recovers_its_newest_local_version(tmp_path: Path) -> None:
    tier, version, _ = _version(tmp_path)
    group = Group()
    hosts = HostMap.gather(group, "a")
    assert replicate(group, hosts, tier, version).bytes_sent == 0
    assert recover(group, hosts, tier, BucketHead("H")).target == version
    assert recover(group, hosts, tier, BucketHead("another head")).target is None


def run_job(tmp_path: Path, ranks: int, per_host: int, scenario: str) -> dict[str, Any]:
    out = subprocess.run(
        torchrun(ranks, CHILD, scenario, str(tmp_path), str(per_host)),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-6000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("ranks", "per_host"), [(2, 1), (4, 1), (4, 2)])
def test_a_replaced_host_recovers_from_its_partner_bit_for_bit(
    tmp_path: Path, ranks: int, per_host: int
) -> None:
    """Three saves replicated (the third unchanged: no blob sent), the last host wiped,
    then recover: every rank loads the saved state; the new host keeps its peer's replica
    again (the child asserts each on every rank)."""
    found = run_job(tmp_path, ranks, per_host, "replaced")
    hosts = found["hosts"]
    assert len(hosts) == ranks // per_host
    leaders = [found["sent"][r] for r in range(0, ranks, per_host)]
    assert all(a > 0 and b > 0 and c == 0 for a, b, c in leaders)
    assert sum(found["received"]) == found["received"][ranks - per_host] > 0
    assert {(t["dst"], t["into"]) for t in found["transfers"]} == {
        (hosts[-1], "own"),
        (hosts[-1], "replica"),
    }


def test_a_failed_transfer_fails_or_falls_back_on_every_rank(tmp_path: Path) -> None:
    """A leader that cannot read its save: replicate raises on every rank; a corrupted
    replica blob: recover returns None on every rank (no hang, no wrong data)."""
    found = run_job(tmp_path, 4, 2, "corrupt")
    assert "rank 2: CorruptCheckpoint" in found["failed"] and "0badf00d" in found["failed"]
    assert "does not match its hash" in found["reason"]


def test_a_tier_on_another_bucket_head_is_not_used(tmp_path: Path) -> None:
    found = run_job(tmp_path, 2, 1, "stale")
    assert found["reason"] == "no local version of ['h0']"


def test_a_replacement_host_with_a_new_id_takes_another_hosts_copy_of_a_replicated_state() -> None:
    # "b" left; "d" replaces it under a new hostname: no replica of "d" exists anywhere.
    hosts = HostMap(("a", "c", "d"), ("a", "c", "d"))  # a -> c -> d -> a
    reports = [
        _holding("a", [4, 3], {"b": [4, 3]}),
        _holding("c", [4, 3], {"a": [4]}),
        _holding("d", [], {}),
    ]
    assert plan(hosts, reports)["target"] is None  # a sharded state: d's share is nowhere
    decided = plan(hosts, reports, replicated=True)
    assert decided["target"] == 4
    # from its partner first (d -> a), a's own copy
    assert decided["fetch"] == [[{"src": "a", "dst": "d", "of": "a", "id": "a-4", "into": "own"}]]
    assert decided["own"] == {"a": "a-4", "c": "c-4"}


def test_the_plan_orders_saves_by_generation_then_step() -> None:
    # After a health rollback the run's generation went up: its steps 4 and 5 come
    # after the abandoned steps 6 to 8, though lower (the saves' place is [generation,
    # step], the same on every host).
    hosts = HostMap(("a", "b"), ("a", "b"))
    reports = [
        {
            "host": h,
            "head": "H",
            "own": [[[1, 5], f"{h}-1.5"], [[0, 8], f"{h}-0.8"]],
            "replicas": {o: [[[1, 5], f"{o}@{h}-1.5"], [[0, 8], f"{o}@{h}-0.8"]]},
        }
        for h, o in (("a", "b"), ("b", "a"))
    ]
    decided = plan(hosts, reports)
    assert tuple(decided["target"]) == (1, 5)
    assert decided["own"] == {"a": "a-1.5", "b": "b-1.5"}
