"""The checks applied to everything read from the store."""

from __future__ import annotations

import pytest

from cloudckpt import schema
from cloudckpt.commit import new_version_id
from cloudckpt.errors import CorruptCheckpoint


def test_version_ids_are_what_commits_make_and_nothing_path_like() -> None:
    assert schema.vid(new_version_id())
    for bad in ["", "../x", "a/b", ".hidden", "x" * 129, "a\x00b", 5, None, "é"]:
        with pytest.raises(schema.Invalid):
            schema.vid(bad)


@pytest.mark.parametrize("good", ["main", "exp/lr-3e-4", "user.name_1", "a" * 200])
def test_plain_names_are_accepted(good: str) -> None:
    assert schema.name(good) == good


@pytest.mark.parametrize(
    "bad", ["", "../x", "a//b", "/abs", "a/./b", "a b", "tab\t", "back\\slash", "x" * 201, 7]
)
def test_names_that_could_leave_their_key_are_refused(bad: object) -> None:
    with pytest.raises(schema.Invalid):
        schema.name(bad)


def test_documents_are_depth_bounded_without_recursion() -> None:
    ok = b"[" * (schema.MAX_DEPTH - 1) + b"]" * (schema.MAX_DEPTH - 1)
    schema.document(ok, "x")
    for depth in (schema.MAX_DEPTH + 1, 100_000):
        with pytest.raises(CorruptCheckpoint, match=r"s3://b/x is (nested deeper|not valid)"):
            schema.document(b"[" * depth + b"]" * depth, "s3://b/x")


def test_typed_fields_name_the_field_and_refuse_lookalikes() -> None:
    checks = {"step": schema.optional(schema.integer), "ok": schema.flag}
    assert schema.fields({"step": None, "ok": True, "new": 1}, checks) == {"step": None, "ok": True}
    for doc in ({"step": "5"}, {"step": True}, {"step": 2**70}, {"ok": 1}):
        with pytest.raises(schema.Invalid, match=r"step|ok"):
            schema.fields(doc, checks)
    with pytest.raises(schema.Invalid, match="a: 'x' is not a number"):
        schema.mapping(schema.text, schema.number)({"a": "x"})


def test_what_readers_refuse_is_refused_at_commit_before_any_upload() -> None:
    import torch

    from cloudckpt import Repo

    repo = Repo("memory://schema/commit-names")
    for kwargs in ({"branch": "../../escape"}, {"step": "5/../x"}, {"branch": "a b"}):
        with pytest.raises(ValueError, match="commit"):
            repo.commit({"w": torch.ones(4)}, **kwargs)
    with pytest.raises(ValueError, match="branch or tag name"):
        repo.commit({"w": torch.ones(4)})
        repo.branch("x/../y")
    assert repo.store.list_keys("blobs/") != [] and len(repo.versions()) == 1


@pytest.mark.parametrize("check", [schema.number, schema.metric, schema.timestamp])
def test_json_integers_past_the_range_of_a_double_are_invalid_not_an_overflow(check) -> None:
    """Found by the fuzzer: ``"seconds": 1e400`` written as an integer."""
    with pytest.raises(schema.Invalid, match=r"range|finite|time"):
        check(10**400)


def test_a_numpy_dtype_string_that_numpy_parses_as_an_expression_is_refused() -> None:
    from cloudckpt import tree

    with pytest.raises(CorruptCheckpoint, match="numpy dtype"):
        tree.numpy_dtype("(2,3)f4,i8 garbage[")
