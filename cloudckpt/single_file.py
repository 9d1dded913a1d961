"""Single-file export (safetensors, or a ``torch.load(weights_only=True)`` file) and
import of existing checkpoints, so users can hand weights to other tools and migrate in."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import fsspec
import numpy as np
import torch

from cloudckpt.errors import UnsupportedState
from cloudckpt.tree import map_arrays, tensors_by_path
from cloudckpt.versions import Version

if TYPE_CHECKING:
    from cloudckpt.repo import Repo

log = logging.getLogger("cloudckpt")

Format = Literal["safetensors", "torch"]
_CASTS = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def export(
    repo: Repo,
    ref: str,
    destination: str,
    *,
    format: Format = "safetensors",
    dtype: str | None = None,
    keys: Iterable[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write version ``ref`` as one file at ``destination`` (a path or any fsspec URI).

    ``safetensors``: every tensor (or those ``keys`` select) by its dotted path.
    ``torch``: the state itself, loadable with ``torch.load(f, weights_only=True)``.
    ``dtype="bf16"`` or ``"fp16"`` casts floating-point tensors -- lossy, opt-in, and
    recorded in the file's metadata. Returns that metadata.
    """
    version = repo.resolve(ref)
    state = repo.load(version.id, keys=keys)
    cast = _cast(dtype)
    meta = {
        "cloudckpt_version": version.id,
        "cloudckpt_uri": repo.uri,
        "step": str(version.step),
        "dtype_cast": dtype or "none",
    }
    if format == "safetensors":
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for path, t in tensors_by_path(state).items():
            if id(t) in seen:  # tied weights: safetensors refuses shared storage
                t = t.clone()
            seen[id(t)] = path
            tensors[path] = _apply_cast(t, cast).contiguous()
        data = save(tensors, metadata=meta)
    elif format == "torch":
        buf = io.BytesIO()
        torch.save({"state": _cast_tree(state, cast), "metadata": meta}, buf)
        data = buf.getvalue()
    else:
        raise ValueError(f"format must be 'safetensors' or 'torch', not {format!r}")
    with fsspec.open(destination, "wb", **(storage_options or {})) as f:
        f.write(data)
    log.info("exported %s to %s (%s, %.1f MB)", version.id, destination, format, len(data) / 1e6)
    return meta


def import_file(
    repo: Repo,
    source: str,
    *,
    branch: str = "main",
    step: int | None = None,
    message: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Version:
    """Commit an existing checkpoint file: safetensors (by extension) or a ``torch.save``
    file, read with ``weights_only=True`` (no code from the file is ever run)."""
    with fsspec.open(source, "rb", **(storage_options or {})) as f:
        data = f.read()
    if source.endswith(".safetensors"):
        from safetensors.torch import load

        state: Any = load(data)
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise UnsupportedState(
                f"{source} is not a weights-only torch checkpoint ({e}); cloudckpt will not "
                "unpickle arbitrary objects"
            ) from None
    note = message or f"imported from {source}"
    return repo.commit(
        state, branch=branch, step=step, message=note, meta={"imported_from": source}
    )


def _cast(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    try:
        return _CASTS[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_CASTS)}, not {dtype!r}") from None


def _apply_cast(t: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    return t.to(cast) if cast is not None and t.is_floating_point() else t


def _cast_tree(state: Any, cast: torch.dtype | None) -> Any:
    """The state with floats cast, and numpy values turned into what
    ``torch.load(weights_only=True)`` accepts (tensors and Python scalars)."""

    def convert(value: Any, path: str) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        return _apply_cast(value, cast)

    return map_arrays(state, convert)
