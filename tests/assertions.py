"""Exact structural equality of training states, for round-trip tests, and a copy of a
state to compare with later."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def assert_state_equal(expected: Any, actual: Any, path: str = "") -> None:
    """Same structure, same types, same dtypes and shapes, bit-identical values."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual)}"
        assert actual.dtype == expected.dtype, f"{where}: {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{where}: {actual.shape} != {expected.shape}"
        assert actual.device.type == "cpu", where
        a, b = expected.detach().contiguous(), actual.contiguous()
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
        return
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape and actual.tobytes() == expected.tobytes(), where
        return
    # A state_dict's OrderedDict loads back as a plain dict: both are mappings.
    assert type(actual) is type(expected) or (
        isinstance(expected, dict) and isinstance(actual, dict)
    ), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for k in expected:
            assert_state_equal(expected[k], actual[k], f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_state_equal(e, a, f"{path}.{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def clone(state: Any) -> Any:
    """A copy of ``state`` (nested dicts and lists) that training it further leaves alone:
    each tensor detached and copied."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone(v) for v in state]
    return state
