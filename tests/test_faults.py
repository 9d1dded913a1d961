"""The fault-injecting proxy, and the library surviving what it injects (real SeaweedFS)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cloudckpt import Repo
from cloudckpt.errors import StoreError
from cloudckpt.repo import RepoOptions
from cloudckpt.store import Store, StoreOptions
from cloudckpt.store.retry import RetryPolicy
from cloudckpt.testing import chaos
from cloudckpt.testing.faults import KINDS, FaultPlan, FaultProxy
from cloudckpt.testing.local_s3 import ACCESS_KEY, SECRET_KEY

CREDENTIALS = {"key": ACCESS_KEY, "secret": SECRET_KEY}
MiB = 1024 * 1024


def report_line(request: pytest.FixtureRequest, line: str) -> None:
    """Show ``line`` in the test output even when output is captured."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\n{request.node.name}: {line}")


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_fault_is_survived(seaweedfs: Any, kind: str) -> None:
    plan = FaultPlan(rate=0.25, seed=11, kinds=(kind,), stall_seconds=1.2)
    if kind == "truncate":  # only answers with a body can be cut short: blob GETs
        plan = FaultPlan(rate=0.5, seed=11, kinds=(kind,), only="^GET .*/blobs/")
    state = {"big": torch.randn(4 * MiB), "small": torch.arange(100)}  # 16 MiB: multipart
    with FaultProxy(seaweedfs.endpoint, plan) as proxy:
        repo = Repo(
            seaweedfs.fresh_uri("faults"),
            proxy.storage_options(CREDENTIALS),
            options=RepoOptions(store=chaos.CHAOS_STORE),
        )
        version = repo.commit(state)
        loaded = repo.load(version.id)
    assert proxy.counts[kind] > 0, proxy.counts
    assert torch.equal(loaded["big"], state["big"]) and torch.equal(loaded["small"], state["small"])


def test_a_part_that_keeps_failing_aborts_the_upload_and_leaves_nothing(seaweedfs: Any) -> None:
    uri = seaweedfs.fresh_uri("abort")
    plan = FaultPlan(rate=1.0, kinds=("slowdown",), only=r"partNumber=2")
    options = StoreOptions(
        part_size=5 * MiB, retry=RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05)
    )
    with FaultProxy(seaweedfs.endpoint, plan) as proxy:
        store = Store(uri, proxy.storage_options(CREDENTIALS), options)
        with pytest.raises(StoreError, match="reduce your request rate") as err:
            store.put("blobs/aa/object", bytes(12 * MiB))
        assert "retry later" in str(err.value)
        assert proxy.counts["slowdown"] == 3
    bucket, prefix = uri.removeprefix("s3://").split("/", 1)
    uploads = seaweedfs.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    assert uploads.get("Uploads", []) == []
    assert Store(uri, seaweedfs.storage_options()).stat("blobs/aa/object") is None


def test_a_lost_response_to_a_conditional_write_is_not_a_conflict(seaweedfs: Any) -> None:
    """The manifest create and the versions.json swap take effect, then the connection
    drops; their retries must see their own write, not another writer's."""
    # Half of these PUTs fail with a 500 after the write took effect.
    plan = FaultPlan(rate=0.5, seed=1, kinds=("internal",), only=r"^PUT .*(manifests|versions)")
    retry = RetryPolicy(attempts=30, initial_backoff=0.001, max_backoff=0.01)
    with FaultProxy(seaweedfs.endpoint, plan) as proxy:
        repo = Repo(
            seaweedfs.fresh_uri("lost"),
            proxy.storage_options(CREDENTIALS),
            options=RepoOptions(store=StoreOptions(retry=retry)),
        )
        first = repo.commit({"x": torch.ones(3)})
        second = repo.commit({"x": torch.zeros(3)})
        with proxy.paused():
            assert [v.id for v in repo.versions()] == [first.id, second.id]
            assert torch.equal(repo.load()["x"], torch.zeros(3))
    assert proxy.counts["internal"] > 0
    assert second.parent == first.id


def test_chaos_run_commits_or_fails_clearly_and_every_version_loads_exactly(
    seaweedfs: Any, request: pytest.FixtureRequest
) -> None:
    report = chaos.run(
        seaweedfs.endpoint,
        CREDENTIALS,
        seaweedfs.fresh_uri("chaos"),
        FaultPlan(rate=0.15, seed=2026, stall_seconds=1.5),
        saves=6,
        seconds=120,
    )
    report_line(request, report.summary())
    assert report.fault_rate >= 0.10
    assert report.saves == 6 and report.committed + len(report.save_failures) == report.saves
    assert all("failed" in f for f in report.save_failures), report.save_failures
    assert report.committed >= 1 and report.loads >= 2 * report.committed
    assert report.mismatches == [] and report.torn == [] and report.load_failures == []
