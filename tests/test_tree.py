"""tree: states <-> skeleton + leaves, without pickle."""

from __future__ import annotations

import json

import pytest
import torch

from cloudckpt import tree
from cloudckpt.errors import CorruptCheckpoint, UnsupportedState


def test_skeleton_is_plain_json_and_rebuilds_the_state() -> None:
    state = {"a": [1, 2.5, None, "s"], 3: (True, b"\x01"), "t": torch.ones(2)}
    skeleton, leaves = tree.flatten(state)
    text = json.dumps(skeleton, allow_nan=False)
    assert [leaf.path for leaf in leaves] == ["t"]
    rebuilt = tree.unflatten(json.loads(text), lambda i, p: leaves[i].value)
    assert rebuilt == {"a": [1, 2.5, None, "s"], 3: (True, b"\x01"), "t": leaves[0].value}


def test_same_view_of_same_storage_is_one_leaf_but_other_views_are_not() -> None:
    w = torch.randn(4, 4)
    state = {"a": w, "b": w, "c": w.view(16), "d": w[1]}
    _, leaves = tree.flatten(state)
    assert [leaf.path for leaf in leaves] == ["a", "c", "d"]


def test_int_subclasses_are_refused_rather_than_silently_changed() -> None:
    import enum

    class Color(enum.IntEnum):
        RED = 1

    with pytest.raises(UnsupportedState, match=r"IntEnum|Color"):
        tree.flatten({"c": Color.RED})


@pytest.mark.parametrize(
    "skeleton",
    [
        {"tensor": -1},
        {"tensor": "0"},
        {"dict": [[1]]},
        {"float": "1e400"},
        {"npscalar": ["O", 1]},
        {"exec": "import os"},
        {"list": "notalist"},
    ],
)
def test_malformed_skeletons_are_corrupt_not_executed(skeleton) -> None:
    with pytest.raises(CorruptCheckpoint):
        tree.unflatten(skeleton, lambda i, p: None)


def test_numpy_dtype_names_are_restricted_to_plain_numbers() -> None:
    assert tree.numpy_dtype("<f4").itemsize == 4
    for bad in ("O", "[('a', 'O')]", "V8", "U3", "nonsense"):
        with pytest.raises(CorruptCheckpoint):
            tree.numpy_dtype(bad)
    with pytest.raises(CorruptCheckpoint):
        tree.torch_dtype("os.system")


def test_the_dtypes_read_without_torch_match_torch() -> None:
    """Manifests are checked without importing torch for these dtypes: their sizes must
    be torch's, and each must be one torch stores."""
    for name, size in tree.PLAIN_TORCH_ITEMSIZES.items():
        assert tree.torch_dtype(name).itemsize == size, name
