"""Parsing ``versions.json``: hostile contents end in CorruptCheckpoint naming it."""

from __future__ import annotations

import json

import pytest

from cloudckpt.errors import CorruptCheckpoint, InvalidKey, UnsupportedFormat
from cloudckpt.versions import FORMAT, PRUNED_FIELDS, Index, Version, pruned_row


def index_with(**fields: object) -> bytes:
    doc = {"format": FORMAT, "branches": {}, "tags": {}, "versions": [], **fields}
    return json.dumps(doc).encode()


@pytest.mark.parametrize("ttl", [-1, 0, float("nan"), 1e9, "x"])
def test_a_crafted_sweep_ttl_is_refused(ttl: object) -> None:
    data = index_with(gc={"epoch": 1, "sweeps": {"t": {"seq": 0, "ttl": ttl}}})
    with pytest.raises(CorruptCheckpoint, match=r"versions\.json is not a valid"):
        Index.parse(data, "s3://b/versions.json")


def test_deep_nesting_is_corrupt_not_a_recursion_error() -> None:
    with pytest.raises(CorruptCheckpoint, match="not a valid"):
        Index.parse(b"[" * 100_000 + b"]" * 100_000, "s3://b/versions.json")


def test_a_newer_format_says_upgrade() -> None:
    with pytest.raises(UnsupportedFormat, match="upgrade cloudckpt"):
        Index.parse(index_with(format=FORMAT + 1), "s3://b/versions.json")


def test_format_1_reads_and_writes_back_as_format_2() -> None:
    old = json.dumps(
        {
            "format": 1,
            "branches": {"main": "v"},
            "tags": {},
            "versions": [{"id": "v", "branch": "main"}],
            "deleted": {"d": 1.5},
        }
    ).encode()
    index = Index.parse(old, "versions.json")
    assert index.fences == {} and index.gc_epoch == 0 and index.deleted == {"d": 1.5}
    again = Index.parse(index.dumps(), "versions.json")
    assert json.loads(index.dumps())["format"] == 2 and again == index


ROW = {"id": "20261202T000000000Z-0a1b2c3d", "branch": "main"}


@pytest.mark.parametrize(
    "row",
    [
        {**ROW, "id": "../../outside/x"},
        {**ROW, "id": "a/b"},
        {**ROW, "branch": "../x"},
        {**ROW, "parent": "/etc/passwd"},
        {**ROW, "step": "5/../../../escaped"},
        {**ROW, "step": True},
        {**ROW, "step": 2**70},
        {**ROW, "metrics": {"loss": "low"}},
        {**ROW, "created": float("inf")},
        {**ROW, "stored_bytes": -1},
        {**ROW, "meta": ["not", "a", "dict"]},
        {**ROW, "fence": 1.5},
        {"branch": "main"},
        ["a", "list"],
    ],
)
def test_a_malformed_row_names_versions_json_and_the_field(row: object) -> None:
    with pytest.raises(CorruptCheckpoint, match=r"versions\.json is not a valid .*repair"):
        Index.parse(index_with(versions=[row]), "s3://b/versions.json")


@pytest.mark.parametrize(
    "fields",
    [
        {"branches": {"main": "../../x"}},
        {"branches": {"../x": ROW["id"]}},
        {"tags": {"t": 5}},
        {"deleted": {"../x": None}},
        {"fences": {"main": "1"}},
        {"gc": {"epoch": -1}},
        {"branches": []},
    ],
)
def test_malformed_heads_tags_and_protocol_fields_are_refused(fields: dict) -> None:
    with pytest.raises(CorruptCheckpoint, match=r"versions\.json is not a valid"):
        Index.parse(index_with(versions=[ROW], **fields), "s3://b/versions.json")


def test_a_path_like_version_id_never_reads_outside_the_root(tmp_path) -> None:
    """A row naming ``../outside/x`` with a manifest planted there: refused, not read."""
    from cloudckpt import Repo

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x.json").write_text("planted")
    repo = Repo(f"file://{tmp_path}/repo")
    planted = index_with(versions=[{**ROW, "id": "../../outside/x"}], branches={"main": "x"})
    repo.store.put("versions.json", planted)
    with pytest.raises(CorruptCheckpoint, match=r"versions\.json.*not a version id"):
        repo.load()
    with pytest.raises(InvalidKey, match="not a plain relative object key"):
        repo.store.get("manifests/../../outside/x.json")


@pytest.mark.parametrize(
    "fields",
    [
        {"branches": {"main": "20261202T000000000Z-99999999"}},
        {"tags": {"t": "20261202T000000000Z-99999999"}},
        {"format": True},
        {"format": 2.0},
        {"fences": {"main": 2**63}},
    ],
)
def test_dangling_heads_and_loose_formats_are_refused(fields: dict) -> None:
    with pytest.raises(CorruptCheckpoint, match=r"versions\.json"):
        Index.parse(index_with(versions=[ROW], **fields), "s3://b/versions.json")


def test_pruned_rows_round_trip_and_older_indexes_read_without_them() -> None:
    """Deleted versions keep their place in the history; the field is optional, so an
    index without it (any earlier release's) reads as having none."""
    assert Index.parse(index_with(), "versions.json").pruned == {}
    row = Version(
        "20261202T000000000Z-0a1b2c3d",
        "main",
        step=10,
        metrics={"loss": 2.0},
        created=1.0,
        logical_bytes=5,
        meta={"reason": "x"},
    )
    index = Index()
    index.prune(row)
    doc = json.loads(index.dumps())
    assert doc["format"] == FORMAT and set(doc["pruned"][0]) == set(PRUNED_FIELDS)
    again = Index.parse(index.dumps(), "versions.json")
    assert again.pruned == {row.id: pruned_row(row)} and again.versions == {}
    assert again.history()[row.id].metrics == {"loss": 2.0}
