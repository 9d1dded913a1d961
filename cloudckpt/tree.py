"""A training state <-> a JSON skeleton plus array leaves. No pickle, in either direction.

Supported: dict (any JSON-able scalar or tuple keys), list, tuple, torch.Size, tensors
(strided, any dtype, any device), numpy arrays and scalars of numeric/bool dtypes, int,
float (including nan/inf), bool, str, bytes, None, torch.dtype and torch.device.
Anything else is refused at commit time with its path in the state.

Tensors that are the same view of the same storage (tied weights) become one leaf and
load as one tensor again.
"""

from __future__ import annotations

import base64
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudckpt import schema
from cloudckpt.errors import CorruptCheckpoint, UnsupportedState

if TYPE_CHECKING:  # torch and numpy are imported where arrays are touched, not at import
    import numpy as np
    import torch


def _storable(d: torch.dtype) -> bool:
    """Plain numeric dtypes (bool, ints, floats, complex, float8): not quantized, bit or
    sub-byte dtypes, which no other tool reads back from raw bytes the same way."""
    name = str(d).removeprefix("torch.")
    return not (
        name.startswith(("q", "bits"))
        or name in {f"{s}int{n}" for s in ("", "u") for n in range(1, 8)}
        or name.startswith("float4")
    )


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        str(d).removeprefix("torch."): d
        for d in vars(torch).values()
        if isinstance(d, torch.dtype) and _storable(d)
    }


_NUMPY_KINDS = set("biufc")


@dataclass
class Leaf:
    """One array in the state: a tensor or a numpy array, and where it sits."""

    path: str
    kind: str  # "torch" | "numpy"
    dtype: str  # torch dtype name ("bfloat16") or numpy dtype str ("<f4")
    shape: tuple[int, ...]
    value: Any = None  # the live array when saving

    @property
    def itemsize(self) -> int:
        return itemsize(self.kind, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


#: Item sizes of the dtypes every torch release stores, so that reading a manifest needs
#: no torch import (tests check they agree with torch); others are looked up in torch.
PLAIN_TORCH_ITEMSIZES = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}


def itemsize(kind: str, name: str) -> int:
    """The item size of a stored dtype (``kind`` "torch" or "numpy"); CorruptCheckpoint
    for a dtype that cannot be stored."""
    if kind == "torch":
        found = PLAIN_TORCH_ITEMSIZES.get(name)
        return found if found is not None else torch_dtype(name).itemsize
    return numpy_dtype(name).itemsize


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _torch_dtypes()[name]
    except KeyError:
        raise CorruptCheckpoint(f"unknown tensor dtype {name!r} in manifest") from None


def numpy_dtype(name: str) -> np.dtype[Any]:
    import numpy as np

    try:
        dt = np.dtype(name)
    except Exception:  # numpy parses some strings as expressions (SyntaxError, ...)
        raise CorruptCheckpoint(f"unknown numpy dtype {name!r} in manifest") from None
    if dt.kind not in _NUMPY_KINDS or dt.fields is not None or dt.subdtype is not None:
        raise CorruptCheckpoint(f"numpy dtype {name!r} is not a plain numeric dtype")
    return dt


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# -- flatten ------------------------------------------------------------------------
def flatten(state: Any) -> tuple[Any, list[Leaf]]:
    """Split ``state`` into a JSON-serializable skeleton and its array leaves."""
    import numpy as np
    import torch

    leaves: list[Leaf] = []
    aliases: dict[tuple[Any, ...], int] = {}

    def tensor_leaf(t: torch.Tensor, path: str) -> int:
        _check_tensor(t, path)
        key = None
        if t.numel() > 0:
            key = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
            if key in aliases:
                return aliases[key]
        leaves.append(Leaf(path, "torch", str(t.dtype).removeprefix("torch."), tuple(t.shape), t))
        if key is not None:
            aliases[key] = len(leaves) - 1
        return len(leaves) - 1

    def walk(obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, torch.Tensor):
            return {"tensor": tensor_leaf(obj, path)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in _NUMPY_KINDS or obj.dtype.fields is not None:
                raise UnsupportedState(
                    f"state[{path!r}]: numpy array of dtype {obj.dtype} cannot be stored "
                    "without pickle; convert it to a numeric array or a list"
                )
            leaves.append(Leaf(path, "numpy", obj.dtype.str, tuple(obj.shape), obj))
            return {"ndarray": len(leaves) - 1}
        if isinstance(obj, np.generic):
            if obj.dtype.kind not in _NUMPY_KINDS:
                raise UnsupportedState(f"state[{path!r}]: numpy scalar of dtype {obj.dtype}")
            return {"npscalar": [obj.dtype.str, walk(obj.item(), path)]}
        if isinstance(obj, int):
            if type(obj) is not int:  # IntEnum and friends would come back as plain int
                raise UnsupportedState(f"state[{path!r}]: {type(obj).__name__} is not a plain int")
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"float": repr(obj)}
        if isinstance(obj, (bytes, bytearray)):
            return {"bytes": base64.b64encode(bytes(obj)).decode()}
        if isinstance(obj, torch.dtype):
            return {"dtype": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {"device": str(obj)}
        if isinstance(obj, dict):
            return {"dict": [[walk_key(k, path), walk(v, join(path, k))] for k, v in obj.items()]}
        if isinstance(obj, torch.Size):
            return {"size": list(obj)}
        if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            tag = "list" if type(obj) is list else "tuple"
            return {tag: [walk(v, join(path, i)) for i, v in enumerate(obj)]}
        raise UnsupportedState(
            f"state[{path!r}] is a {type(obj).__module__}.{type(obj).__qualname__}, which "
            "cloudckpt cannot store without pickle. Store its state_dict() or convert it to "
            "tensors, numbers, strings, lists and dicts"
        )

    def walk_key(k: Any, path: str) -> Any:
        if isinstance(k, (str, bool, int, float, tuple)) or k is None:
            return walk(k, join(path, "<key>"))
        raise UnsupportedState(f"state[{path!r}] has a dict key of type {type(k).__name__}")

    try:
        skeleton = walk(state, "")
        schema.check_depth(skeleton, schema.MAX_DEPTH - 2)
    except (RecursionError, schema.Invalid):
        raise UnsupportedState(
            "the state nests too deeply to be read back (its skeleton would nest more than "
            f"{schema.MAX_DEPTH - 2} JSON levels, three per level of dicts); flatten it"
        ) from None
    return skeleton, leaves


def _check_tensor(t: torch.Tensor, path: str) -> None:
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise UnsupportedState(
            f"state[{path!r}] is a {type(t).__name__}; only plain tensors are supported "
            "(for DTensor/sharded state use the torch.distributed.checkpoint backend)"
        )
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise UnsupportedState(f"state[{path!r}]: {t.layout} / quantized tensors are not supported")
    if t.device.type == "meta":
        raise UnsupportedState(f"state[{path!r}] is on the meta device and has no data")
    if t.dtype not in _torch_dtypes().values():
        raise UnsupportedState(f"state[{path!r}] has unsupported dtype {t.dtype}")


# -- unflatten ----------------------------------------------------------------------
_ALLOWED_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def flat_skeleton(names: list[str]) -> Any:
    """The skeleton of a flat dict mapping ``names[i]`` to leaf ``i``."""
    return {"dict": [[name, {"tensor": i}] for i, name in enumerate(names)]}


def unflatten(skeleton: Any, arrays: Callable[[int, str], Any]) -> Any:
    """Rebuild a state from its skeleton; ``arrays(index, path)`` supplies each leaf."""

    def build(node: Any, path: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, dict) and len(node) == 1:
            ((tag, val),) = node.items()
            if tag in ("tensor", "ndarray"):
                return arrays(_index(val, path), path)
            if tag == "dict":
                out = {}
                for pair in _pairs(val, path):
                    key = build(pair[0], join(path, "<key>"))
                    value = build(pair[1], join(path, key))
                    try:
                        out[key] = value
                    except TypeError:  # a list where a key should be
                        raise _malformed(path) from None
                return out
            if tag in ("list", "tuple", "size"):
                items = [build(v, join(path, i)) for i, v in enumerate(_items(val, path))]
                if tag == "size" and not all(type(i) is int and i >= 0 for i in items):
                    raise _malformed(path)
                if tag == "size":
                    import torch

                    return torch.Size(items)
                return {"list": list, "tuple": tuple}[tag](items)
            if tag == "float" and val in _ALLOWED_FLOATS:
                return _ALLOWED_FLOATS[val]
            if tag == "npscalar" and isinstance(val, list) and len(val) == 2:
                dtype = numpy_dtype(val[0])
                scalar = build(val[1], path)
                if type(scalar) in (bool, int, float):
                    return _converted(lambda: dtype.type(scalar), path)
            if tag == "bytes" and isinstance(val, str):
                return _converted(lambda: base64.b64decode(val, validate=True), path)
            if tag == "dtype" and isinstance(val, str):
                return torch_dtype(val)
            if tag == "device" and isinstance(val, str):
                import torch

                return _converted(lambda: torch.device(val), path)
        raise _malformed(path)

    return build(skeleton, "")


def _malformed(path: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"manifest: malformed state node at {path or '<root>'!r}")


def _converted(make: Callable[[], Any], path: str) -> Any:
    """A stored scalar made into its type; a value out of its type's range or a string
    that names nothing is a malformed node."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (then wraps) on overflow
            return make()
    except (TypeError, ValueError, OverflowError, RuntimeError, Warning):
        raise _malformed(path) from None


def _index(val: Any, path: str) -> int:
    if type(val) is not int or val < 0:
        raise CorruptCheckpoint(f"manifest: bad leaf index at {path!r}")
    return val


def _items(val: Any, path: str) -> list[Any]:
    if not isinstance(val, list):
        raise CorruptCheckpoint(f"manifest: expected a list at {path!r}")
    return val


def _pairs(val: Any, path: str) -> Iterator[list[Any]]:
    for pair in _items(val, path):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CorruptCheckpoint(f"manifest: malformed dict entry at {path!r}")
        yield pair


def select(skeleton: Any, wanted: Callable[[str], bool]) -> Any:
    """The skeleton pruned to the entries whose path ``wanted`` accepts.

    Dict entries not wanted are dropped; list and tuple items not wanted become None, so
    positions keep their meaning. Returns None when nothing is wanted.
    """

    def prune(node: Any, path: str) -> tuple[bool, Any]:
        if path and wanted(path):
            return True, node
        if isinstance(node, dict) and len(node) == 1:
            ((tag, val),) = node.items()
            if tag == "dict" and isinstance(val, list):
                kept = []
                for pair in _pairs(val, path):
                    key = unflatten(pair[0], _no_arrays)
                    ok, sub = prune(pair[1], join(path, key))
                    if ok:
                        kept.append([pair[0], sub])
                return bool(kept), {"dict": kept}
            if tag in ("list", "tuple") and isinstance(val, list):
                items = [prune(v, join(path, i)) for i, v in enumerate(val)]
                if any(ok for ok, _ in items):
                    return True, {tag: [sub if ok else None for ok, sub in items]}
        return False, None

    ok, pruned = prune(skeleton, "")
    return pruned if ok else None


def _no_arrays(index: int, path: str) -> Any:
    raise CorruptCheckpoint(f"manifest: an array used as a dict key at {path!r}")


def tensors_by_path(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list/tuple, by its path (other values are ignored)."""
    import torch

    found: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, torch.Tensor):
            found[path] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, join(path, k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, join(path, i))

    walk(obj, prefix)
    return found


_ATOMS = (int, float, bool, str, bytes, type(None))


def map_arrays(obj: Any, fn: Callable[[Any, str], Any], prefix: str = "") -> Any:
    """A copy of ``obj`` with every tensor, numpy array and numpy scalar replaced by
    ``fn(value, path)``; dicts, lists and tuples are rebuilt, other leaves kept as they
    are (a tuple of plain scalars, like an RNG state, is kept whole)."""
    import numpy as np
    import torch

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, (torch.Tensor, np.ndarray, np.generic)):
            return fn(node, path)
        if isinstance(node, dict):
            return {k: walk(v, join(path, k)) for k, v in node.items()}
        if type(node) in (tuple, torch.Size) and all(type(v) in _ATOMS for v in node):
            return node
        if type(node) in (list, tuple, torch.Size):
            return type(node)(walk(v, join(path, i)) for i, v in enumerate(node))
        return node

    return walk(obj, prefix)
