"""Parsing ``versions.json``: hostile contents end in CorruptCheckpoint naming it."""

from __future__ import annotations

import json

import pytest

from cloudckpt.errors import CorruptCheckpoint, UnsupportedFormat
from cloudckpt.versions import FORMAT, Index


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
    old = json.dumps({"format": 1, "branches": {"main": "v"}, "tags": {}, "versions": [
        {"id": "v", "branch": "main"}], "deleted": {"d": 1.5}}).encode()  # fmt: skip
    index = Index.parse(old, "versions.json")
    assert index.fences == {} and index.gc_epoch == 0 and index.deleted == {"d": 1.5}
    again = Index.parse(index.dumps(), "versions.json")
    assert json.loads(index.dumps())["format"] == 2 and again == index
