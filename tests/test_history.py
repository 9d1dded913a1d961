"""Branches, tags, log, diff, verify, repair, gc, export and import, on moto and SeaweedFS."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
import torch
from assertions import assert_state_equal
from safetensors.torch import load_file

from cloudckpt import CommitConflict, Repo, RepoOptions, TransferOptions
from cloudckpt.blobs import blob_key
from cloudckpt.errors import CheckpointNotFound, UnsupportedState
from cloudckpt.testing.gpt import GPTConfig, train_state


@pytest.fixture
def repo(s3_backend) -> Repo:
    uri, opts = s3_backend
    return Repo(uri, opts, options=RepoOptions(transfer=TransferOptions(chunk_size=4096)))


def weights(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": {"a": torch.randn(64, 64), "b": torch.randn(64)}, "step": seed}


def test_branch_from_a_version_shares_blobs_and_log_crosses_the_branch_point(repo) -> None:
    v1 = repo.commit(weights(1), step=1)
    v2 = repo.commit(weights(2), step=2)
    repo.branch("low-lr", v1.id)
    assert repo.branches() == {"main": v2.id, "low-lr": v1.id}
    state = weights(1)
    state["model"]["b"] += 1  # only one small tensor changes
    v3 = repo.commit(state, branch="low-lr", step=3)
    assert v3.parent == v1.id
    assert v3.uploaded_bytes < 1024  # the 16 KiB matrix is shared with v1
    assert [v.id for v in repo.log("low-lr")] == [v3.id, v1.id]
    assert [v.id for v in repo.log("main")] == [v2.id, v1.id]
    with pytest.raises(CommitConflict, match="already exists"):
        repo.branch("low-lr", "main")
    with pytest.raises(ValueError, match="cannot name"):
        repo.branch("latest", "main")


def test_tags_name_versions_and_never_move(repo) -> None:
    v1 = repo.commit(weights(1))
    repo.tag("release-1", v1.id)
    repo.tag("release-1", v1.id)  # idempotent
    v2 = repo.commit(weights(2))
    with pytest.raises(CommitConflict, match="already names"):
        repo.tag("release-1", v2.id)
    assert repo.tags() == {"release-1": v1.id}
    assert_state_equal(weights(1), repo.load("release-1"))
    with pytest.raises(CommitConflict, match="tagged"):
        repo.delete([v1.id])


def test_diff_reports_added_removed_changed_bytes_and_norm(repo) -> None:
    a = weights(1)
    repo.commit(a)
    b = {"model": {"a": a["model"]["a"].clone(), "c": torch.ones(3)}, "step": 2}
    b["model"]["a"][0, :2] += torch.tensor([3.0, 4.0])
    repo.commit(b)
    d = repo.diff(repo.versions()[0].id, "main")
    assert d.added == ["model.c"] and d.removed == ["model.b"]
    (change,) = d.changed
    assert change.path == "model.a" and change.changed_bytes == 4096  # one chunk of four
    assert change.norm == pytest.approx(5.0)


def test_verify_reports_each_bad_blob(repo) -> None:
    repo.commit(weights(1))
    assert repo.verify().ok
    chunks = [c[0] for e in repo.manifest().tensors for c in e["chunks"]]
    blob = repo.store.get(blob_key(chunks[0]))
    repo.store.put(blob_key(chunks[0]), blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    repo.store.delete([blob_key(chunks[1])])
    report = repo.verify()
    assert not report.ok
    assert set(report.problems) == {blob_key(chunks[0]), blob_key(chunks[1])}
    assert "missing" in report.problems[blob_key(chunks[1])]


def test_repair_rebuilds_versions_json_from_manifests(repo) -> None:
    v1 = repo.commit(weights(1), step=1, metrics={"loss": 2.0})
    repo.branch("exp", v1.id)
    v2 = repo.commit(weights(2), branch="exp", step=2)
    v3 = repo.commit(weights(3), step=3)
    repo.tag("good", v1.id)
    repo.store.put("versions.json", b"{garbled")
    with pytest.raises(Exception, match="repair"):
        repo.load()
    rebuilt = repo.repair()
    assert rebuilt.branches == {"main": v3.id, "exp": v2.id}
    assert repo.resolve(v1.id).metrics == {"loss": 2.0}
    assert_state_equal(weights(3), repo.load())


def test_gc_frees_exactly_the_blobs_no_other_version_uses(repo) -> None:
    a = weights(1)
    v1 = repo.commit(a)
    shared = {c[0] for e in repo.manifest().tensors if e["path"] == "model.a" for c in e["chunks"]}
    a["model"]["b"] = torch.randn(64) + 10
    repo.commit(a)
    only_v1 = {c[0] for e in repo.manifest(v1.id).tensors for c in e["chunks"]} - shared
    only_v1 -= {c[0] for e in repo.manifest().tensors for c in e["chunks"]}
    repo.delete([v1.id])
    before = repo.store.list_keys()
    dry = repo.gc(grace=0, dry_run=True)
    assert repo.store.list_keys() == before  # a dry run deletes nothing
    report = repo.gc(grace=0)
    assert {k.rsplit("/", 1)[-1] for k in report.blobs} == only_v1 and only_v1
    assert report.blobs == dry.blobs and report.freed_bytes == dry.freed_bytes
    assert report.manifests == [f"manifests/{v1.id}.json"]
    assert shared <= {k.rsplit("/", 1)[-1] for k in repo.store.list_keys("blobs")}
    assert_state_equal(a, repo.load())
    with pytest.raises(CheckpointNotFound):
        repo.load(v1.id)


def test_gc_running_during_commits_never_damages_them(repo) -> None:
    done = threading.Event()
    committed = []

    errors: list[BaseException] = []

    def commit(i: int) -> str:
        # Collections back to back can outlast a commit's attempts on a loaded machine:
        # CommitConflict says "commit again", which is what a caller does.
        for _ in range(3):
            try:
                return repo.commit(weights(i)).id
            except CommitConflict as e:
                last = e
        raise last

    def commit_loop() -> None:
        try:
            for i in range(6):
                committed.append(commit(i))
                if i % 2:
                    repo.delete([committed[-2]])
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=commit_loop)
    t.start()
    deadline = time.monotonic() + 300
    while not done.wait(0.05) and time.monotonic() < deadline:
        repo.gc(grace=0)
    t.join(timeout=60)
    assert not errors and len(committed) == 6, errors
    repo.gc(grace=0)
    for v in repo.versions():
        assert repo.verify(v.id).ok


def test_fast_forward_commits_on_top_of_a_moved_branch(repo) -> None:
    repo.commit(weights(1))
    other = Repo(repo.uri, repo.store.fs.storage_options)
    original = repo.store.put_if_absent
    moved = []

    def racing(key: str, data: bytes) -> bool:
        if key.startswith("manifests/") and not moved:
            moved.append(other.commit(weights(2)).id)
        return original(key, data)

    repo.store.put_if_absent = racing  # type: ignore[method-assign]
    v = repo.commit(weights(3), fast_forward=True)
    assert v.parent == moved[0] and repo.branches()["main"] == v.id


def test_export_safetensors_equals_the_version_and_bf16_is_half(repo, tmp_path) -> None:
    state = train_state(GPTConfig(n_layer=1, n_embd=32), steps=1)
    repo.commit(state)
    meta = repo.export("main", str(tmp_path / "w.safetensors"), keys=["model"])
    loaded = load_file(str(tmp_path / "w.safetensors"))
    for name, t in state["model"].items():
        assert torch.equal(loaded[f"model.{name}"], t), name
    repo.export("main", str(tmp_path / "w16.safetensors"), keys=["model"], dtype="bf16")
    full = (tmp_path / "w.safetensors").stat().st_size
    half = (tmp_path / "w16.safetensors").stat().st_size
    assert half == pytest.approx(full / 2, rel=0.02)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w16.safetensors"), "pt") as f:
        assert f.metadata()["dtype_cast"] == "bf16"
    assert meta["cloudckpt_version"] == repo.resolve("main").id


def test_export_torch_loads_weights_only_and_import_round_trips(repo, tmp_path) -> None:
    state = train_state(GPTConfig(n_layer=1, n_embd=32), steps=1)
    repo.commit(state)
    path = tmp_path / "ckpt.pt"
    repo.export("main", str(path), format="torch")
    loaded = torch.load(path, weights_only=True)
    assert_state_equal(state["model"], loaded["state"]["model"])
    v = repo.import_file(str(path), branch="imported")
    assert_state_equal(loaded, repo.load(v.id))


def test_import_refuses_a_pickle_that_runs_code(repo, tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    (tmp_path / "evil.pt").write_bytes(buf.getvalue())
    with pytest.raises(UnsupportedState, match="weights-only"):
        repo.import_file(str(tmp_path / "evil.pt"))
    assert json.loads(json.dumps(repo.branches())) == {}
