"""What ``Repo.load(into=...)`` writes into: selecting entries, finding or allocating the
arrays that chunks are decoded into (the caller's own tensors where they fit), and handing
the loaded state to each object's ``load_state_dict``."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cloudckpt import manifest, tree
from cloudckpt.errors import CorruptCheckpoint

if TYPE_CHECKING:  # imported where arrays are allocated, not at import
    import torch


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


def apply(into: Any, state: Any, where: str) -> None:
    """Call each object's ``load_state_dict`` with its part of ``state`` (loaded from
    ``where``); CorruptCheckpoint if the state does not fit it."""
    for prefix, obj in _targets_of(into):
        if not hasattr(obj, "load_state_dict"):
            continue
        if prefix == "":
            part = state
        elif isinstance(state, Mapping) and prefix in state:
            part = state[prefix]
        else:
            raise CorruptCheckpoint(
                f"{where}: the state has no entry {prefix!r} to load into; the version holds "
                "another kind of state"
            )
        try:
            obj.load_state_dict(part)
        except (
            RuntimeError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            OverflowError,
            AssertionError,
        ) as e:
            # Stored data is not trusted: a state that does not fit is refused like any
            # corrupt version (restore then tries an older one).
            raise CorruptCheckpoint(
                f"{where}: does not load into {prefix or type(obj).__name__} "
                f"({type(e).__name__}: {str(e)[:300]}); the version holds another model's "
                "state, or its manifest was altered"
            ) from None


def allocate(entry: dict[str, Any], dest: torch.Tensor | None) -> Any:
    """The array a manifest entry loads into: ``dest`` if it fits, else a new one."""
    import numpy as np
    import torch

    kind, dtype, shape = manifest.check_entry(entry)
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
