"""DCP's metadata as JSON (no pickles): the global layout a version's manifest records,
and the non-tensor values DCP writes as byte streams."""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.checkpoint import LoadPlanner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from cloudckpt import tree
from cloudckpt.errors import CorruptCheckpoint, UnsupportedState
from cloudckpt.repo import Repo, RepoOptions


def retarget(
    repo: Repo,
    checkpoint_id: str | os.PathLike[str] | None,
    storage_options: dict[str, Any] | None,
    options: RepoOptions | None,
) -> Repo:
    """The repository a DCP ``checkpoint_id`` (a URI) names: ``repo`` if it names that."""
    if checkpoint_id is None or str(checkpoint_id) == repo.uri:
        return repo
    return Repo(str(checkpoint_id), storage_options, options=options)


def key(index: MetadataIndex) -> str:
    where = offset(index)
    return index.fqn if where is None else f"{index.fqn}@{','.join(map(str, where))}"


def offset(index: MetadataIndex) -> list[int] | None:
    return None if index.offset is None else [int(x) for x in index.offset]


def size(value: Any) -> torch.Size | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, int) and x >= 0 for x in value):
        raise ValueError(f"bad offsets or sizes {value!r}")
    return torch.Size(value)


def describe(md: Any, dtype: str | None = None) -> dict[str, Any]:
    """``md`` as JSON; ``dtype``: the one its tensor was actually written in."""
    if isinstance(md, BytesStorageMetadata):
        return {"bytes": True}
    props = md.properties
    return {
        "dtype": dtype or str(props.dtype).removeprefix("torch."),
        "requires_grad": bool(props.requires_grad),
        "size": [int(x) for x in md.size],
        "chunks": [[[int(x) for x in c.offsets], [int(x) for x in c.sizes]] for c in md.chunks],
    }


def parse(doc: dict[str, Any]) -> Any:
    if doc.get("bytes"):
        return BytesStorageMetadata()
    props = TensorProperties(
        dtype=tree.torch_dtype(doc["dtype"]), requires_grad=bool(doc.get("requires_grad", False))
    )
    chunks = [ChunkStorageMetadata(size(o), size(s)) for o, s in doc["chunks"]]
    return TensorStorageMetadata(props, size(doc["size"]), chunks)  # type: ignore[arg-type]


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise UnsupportedState(f"DCP planner data holds a {type(value).__name__}")


def tuples(value: Any) -> Any:
    """DCP's planner data maps flattened keys to paths, which it expects as tuples."""
    if isinstance(value, dict):
        return {k: tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(tuples(v) for v in value)
    return value


def object_skeleton(fqn: str, resolve: Callable[[], Any]) -> Any:
    """The stored form of a non-tensor value: what the save planner's ``resolve_data``
    produces (a ``torch.save`` stream made by the user's own planner, in this process),
    read back with ``weights_only`` and kept as a tree of plain values."""
    try:
        data = resolve()
        if isinstance(data, torch.Tensor) or not hasattr(data, "read"):
            raise TypeError(f"the planner resolved it to a {type(data).__name__}, not a stream")
        if hasattr(data, "seek"):
            data.seek(0)
        value = torch.load(data, weights_only=True)
    except (pickle.PickleError, RuntimeError, ValueError, TypeError, EOFError) as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it holds a {found.group(1)}" if found else str(e).splitlines()[0][:200]
        raise UnsupportedState(
            f"{fqn}: cloudckpt stores non-tensor values as JSON, never as pickles, so it "
            f"takes numbers, strings, lists, tuples and dicts of them ({why}); convert the "
            "value or keep it out of the DCP state_dict"
        ) from None
    skeleton, leaves = tree.flatten(value)
    if leaves:
        raise UnsupportedState(
            f"{fqn}: a non-tensor value holds tensors (with flatten_state_dict=False, DCP "
            "writes a dict of tensors as one pickled object); keep DCP's default "
            "flatten_state_dict=True"
        )
    return skeleton


def deliver_object(planner: LoadPlanner, req: ReadItem, skeleton: Any) -> None:
    """Hand a stored non-tensor value to the load planner.

    DCP's own ``load_bytes`` would ``torch.load`` a stream; for a planner that keeps it,
    the value is set where that method sets it, so nothing is unpickled at all. A planner
    that overrides ``load_bytes`` gets it as DCP defines: a stream, made here by
    ``torch.save`` of the value decoded from the validated stored JSON (nothing read from
    the store is ever unpickled)."""
    fqn = req.storage_index.fqn

    def no_arrays(index: int, path: str) -> Any:
        raise CorruptCheckpoint(f"{fqn}: a stored value refers to arrays")

    value = tree.unflatten(skeleton, no_arrays)
    own = getattr(type(planner), "load_bytes", None) is DefaultLoadPlanner.load_bytes
    if isinstance(planner, DefaultLoadPlanner) and own and "load_bytes" not in vars(planner):
        if planner.flatten_state_dict:
            where = planner.mappings[req.dest_index.fqn]
            set_element(planner.original_state_dict, where, value)
        else:
            planner.state_dict[req.dest_index.fqn] = value
        return
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    planner.load_bytes(req, buffer)
