"""Single-file export (safetensors, or a ``torch.load(weights_only=True)`` file) and
import of existing checkpoints, so users can hand weights to other tools and migrate in."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import fsspec

from cloudckpt.blobs.progress import Progress
from cloudckpt.errors import UnsupportedState
from cloudckpt.tree import map_arrays
from cloudckpt.versions import Version

if TYPE_CHECKING:  # imported by the functions, so that the module loads without torch
    import torch

    from cloudckpt.repo import Repo

log = logging.getLogger("cloudckpt")

Format = Literal["safetensors", "torch"]
#: File extension -> the format it implies.
EXTENSIONS: dict[str, Format] = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
}
_CASTS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16"}


def format_for(destination: str, format: Format | None = None) -> Format:
    """The format to write ``destination`` in: ``format`` if given, else the one its
    extension implies (safetensors when it implies none). ValueError if the two
    disagree: a ``.safetensors`` file holding a pickle would fail every loader."""
    implied = next((f for ext, f in EXTENSIONS.items() if destination.endswith(ext)), None)
    if format is None:
        return implied or "safetensors"
    if format not in ("safetensors", "torch"):
        raise ValueError(f"format must be 'safetensors' or 'torch', not {format!r}")
    if implied is not None and implied != format:
        raise ValueError(
            f"{destination} names a {implied} file but the format asked for is {format}; "
            "change the extension or the format"
        )
    return format


def strip(names: Iterable[str], prefix: str) -> dict[str, str]:
    """Each name -> the name without ``prefix`` (a dotted path; a trailing ``.`` is
    implied). ValueError if a name lacks it."""
    head = prefix.rstrip(".") + "."
    out: dict[str, str] = {}
    for name in names:
        if not name.startswith(head):
            raise ValueError(
                f"entry {name!r} does not start with {head!r}: select the entries under it "
                f"with keys=[{head[:-1]!r}] (--keys {head[:-1]})"
            )
        out[name] = name[len(head) :]
    return out


def export(
    repo: Repo,
    ref: str,
    destination: str,
    *,
    format: Format | None = None,
    dtype: str | None = None,
    keys: Iterable[str] | None = None,
    strip_prefix: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write version ``ref`` as one file at ``destination`` (a path or any fsspec URI).

    ``format``: by default the one the extension implies (``.safetensors``; ``.pt`` or
    ``.pth``: torch), else safetensors; ValueError if it contradicts the extension.
    ``safetensors``: every tensor and numpy array (or those ``keys`` select) by its dotted
    path; two of one path are refused (UnsupportedState).
    ``torch``: the state itself, loadable with ``torch.load(f, weights_only=True)``.
    ``strip_prefix="model."`` writes ``model.wte.weight`` as ``wte.weight``: a flat
    state dict (in both formats) that ``load_state_dict`` and safetensors loaders take
    as-is. ``dtype="bf16"`` or ``"fp16"`` casts floating-point tensors -- lossy, opt-in,
    and recorded in the file's metadata. Returns that metadata.
    """
    import torch

    format = format_for(destination, format)
    version = repo.resolve(ref)
    state = repo.load(version.id, keys=keys)
    cast = _cast(dtype)
    meta = {
        "cloudckpt_version": version.id,
        "cloudckpt_uri": repo.uri,
        "step": str(version.step),
        "dtype_cast": dtype or "none",
    }
    if strip_prefix is not None:
        meta["stripped_prefix"] = strip_prefix
        found = _named_tensors(state, version.id)
        names = strip(found, strip_prefix)
        state = {names[path]: t for path, t in found.items()}
    if format == "safetensors":
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for path, t in _named_tensors(state, version.id).items():
            if id(t) in seen:  # tied weights: safetensors refuses shared storage
                t = t.clone()
            seen[id(t)] = path
            tensors[path] = _apply_cast(t, cast).contiguous()
        data = save(tensors, metadata=meta)
    else:
        buf = io.BytesIO()
        flat = strip_prefix is not None  # a state dict as load_state_dict takes it
        torch.save(
            _cast_tree(state, cast)
            if flat
            else {"state": _cast_tree(state, cast), "metadata": meta},
            buf,
        )
        data = buf.getvalue()
    _write(destination, data, repo.options.transfer.progress, storage_options)
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
    import torch

    data = _read(source, repo.options.transfer.progress, storage_options)
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


#: The bytes written or read per call, between progress updates.
PIECE = 8 << 20


def _write(
    destination: str, data: bytes, progress: bool, storage_options: dict[str, Any] | None
) -> None:
    bar = Progress(progress, len(data), "write")
    try:
        with fsspec.open(destination, "wb", **(storage_options or {})) as f:
            view = memoryview(data)
            for start in range(0, len(view), PIECE):
                f.write(view[start : start + PIECE])
                bar.update(min(PIECE, len(view) - start))
    finally:
        bar.close()


def _read(source: str, progress: bool, storage_options: dict[str, Any] | None) -> bytes:
    with fsspec.open(source, "rb", **(storage_options or {})) as f:
        bar = Progress(progress, getattr(f, "size", None) or 0, "read")
        try:
            pieces = []
            while piece := f.read(PIECE):
                pieces.append(piece)
                bar.update(len(piece))
        finally:
            bar.close()
    return b"".join(pieces)


def _cast(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    import torch

    try:
        return getattr(torch, _CASTS[dtype])
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_CASTS)}, not {dtype!r}") from None


def _apply_cast(t: torch.Tensor, cast: torch.dtype | None) -> torch.Tensor:
    return t.to(cast) if cast is not None and t.is_floating_point() else t


def _named_tensors(state: Any, vid: str) -> dict[str, torch.Tensor]:
    """Every array of ``state`` (numpy ones as tensors) by its dotted path; UnsupportedState
    if two of them share a path (``{"a.b": x, "a": {"b": y}}``): one file cannot hold both."""
    import torch

    found: dict[str, torch.Tensor] = {}

    def keep(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            if path in found:
                raise UnsupportedState(
                    f"version {vid}: two tensors export as {path!r}; a single file names "
                    "each by its dotted path (rename one key, or export with --keys)"
                )
            found[path] = value
        return value

    map_arrays(_cast_tree(state, None), keep)
    return found


def _cast_tree(state: Any, cast: torch.dtype | None) -> Any:
    """The state with floats cast, and numpy values turned into what
    ``torch.load(weights_only=True)`` accepts (tensors and Python scalars)."""
    import numpy as np
    import torch

    def convert(value: Any, path: str) -> Any:
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        return _apply_cast(value, cast)

    return map_arrays(state, convert)
