"""Helpers of ``Repo.load``: selecting entries, and finding or allocating the arrays that
chunks are decoded into (the caller's own tensors where they fit)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cloudckpt import tree
from cloudckpt.blobs import iter_chunks
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint


def matches(path: str, patterns: list[str]) -> bool:
    return any(
        path == p or path.startswith(p + ".") or fnmatch.fnmatchcase(path, p) for p in patterns
    )


def _targets_of(into: Any) -> list[tuple[str, Any]]:
    if into is None:
        return []
    if hasattr(into, "state_dict") and hasattr(into, "load_state_dict"):
        return [("", into)]
    if isinstance(into, Mapping):
        return [(str(k), v) for k, v in into.items()]
    raise TypeError(
        "into= takes an object with state_dict()/load_state_dict() or a mapping of them, "
        f"not {type(into).__name__}"
    )


def destinations(into: Any) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for prefix, obj in _targets_of(into):
        current = obj.state_dict() if hasattr(obj, "state_dict") else obj
        found.update(tree.tensors_by_path(current, prefix))
    return found


def apply(into: Any, state: Any) -> None:
    for prefix, obj in _targets_of(into):
        if not hasattr(obj, "load_state_dict"):
            continue
        if prefix == "":
            obj.load_state_dict(state)
        elif isinstance(state, Mapping) and prefix in state:
            obj.load_state_dict(state[prefix])
        else:
            raise CheckpointNotFound(f"the loaded state has no entry {prefix!r} to load into")


def check_entry(entry: dict[str, Any]) -> tuple[str, Any, tuple[int, ...]]:
    """Validate a manifest entry before anything is allocated for it: its kind, an
    allowed dtype, a shape whose byte size equals what its chunks hold. Returns
    ``(kind, dtype, shape)`` with the dtype as a torch or numpy dtype."""
    where = f"manifest entry {entry.get('path')!r}"
    try:
        shape = tuple(int(d) for d in entry["shape"])
        kind, name = entry["kind"], entry["dtype"]
        if any(d < 0 for d in shape):
            raise ValueError("negative dimension")
        nbytes = sum(c.size for c in iter_chunks(entry))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpoint(f"{where} is malformed ({e})") from None
    if kind == "numpy":
        dtype: Any = tree.numpy_dtype(name)
    elif kind == "torch":
        dtype = tree.torch_dtype(name)
    else:
        raise CorruptCheckpoint(f"{where} has unknown kind {kind!r}")
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if expected != nbytes:
        raise CorruptCheckpoint(
            f"{where}: chunks hold {nbytes} bytes but shape {list(shape)} needs {expected}"
        )
    return kind, dtype, shape


def allocate(entry: dict[str, Any], dest: torch.Tensor | None) -> Any:
    """The array a manifest entry loads into: ``dest`` if it fits, else a new one."""
    kind, dtype, shape = check_entry(entry)
    if kind == "numpy":
        return np.empty(shape, dtype=dtype)
    if (
        dest is not None
        and tuple(dest.shape) == shape
        and dest.dtype == dtype
        and dest.is_contiguous()
    ):
        return dest.detach()
    return torch.empty(shape, dtype=dtype)
