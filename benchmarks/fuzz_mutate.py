"""The mutations of the fuzzer (benchmarks/fuzz.py): one stored object's bytes -> new
bytes (or None: the object is removed), drawn from a seeded ``random.Random`` so that a
``seed:input`` pair names one mutation for good (given the same pristine repository).

Byte-level mutations apply to every object; JSON-level ones to the objects that parse as
JSON (versions.json, manifests, leases, markers, the Lightning pointer).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: Path-like strings planted in place of stored strings (``{sandbox}`` is replaced by the
#: absolute path of the input's sandbox, so a write through it would be seen).
PATH_STRINGS = (
    "../../x",
    "/etc/passwd",
    "a/../../b",
    "x\x00y",
    "5/../../../escaped",
    "..",
    ".",
    "",
    "/",
    "..\\..\\x",
    "%2e%2e/x",
    "{sandbox}/abs-escape",
    "file:///etc",
    "a/b",
    "~/x",
    "checkpoint-1/../../../../escaped",
    "x" * 5000,
)
#: Strings that climb out of a directory a path is built in (none climbs more than five
#: levels: the sandbox is six deep).
TRAVERSALS = (
    "5/../../../escaped",
    "checkpoint-1/../../../../escaped",
    "a/../../b",
    "../../x",
    "{sandbox}/abs-escape",
    "../../../../../escaped",
    "x/../../../.cloudckpt/evil",
)
#: Fields that name something a reader builds a key or a path from.
NAMING = frozenset(
    (
        "id",
        "parent",
        "branch",
        "step",
        "version",
        "repo",
        "path",
        "message",
        "host",
        "token",
        "dtype",
        "kind",
        "format",
        "lightning_path",
    )
)
HUGE = (
    1e308,
    -1e308,
    2**70,
    -(2**70),
    -1,
    2**63,
    2**64,
    -(2**63) - 1,
    math.inf,
    -math.inf,
    math.nan,
    0,
    5e-324,
    10**400,
)
DEPTHS = (5_000, 100_000)
BYTE_KINDS = ("bitflip", "truncate", "extend", "splice", "garbage", "empty", "delete")
JSON_KINDS = (
    "type_swap",
    "huge_number",
    "deep_nesting",
    "path_string",
    "traversal",
    "remove_key",
    "duplicate_key",
    "wrong_id",
    "number_tweak",
    "swap_items",
)
#: How often each JSON mutation is drawn (a climb out of a directory through a naming
#: field is the one hostile data is after, and needs a precise hit).
JSON_WEIGHTS = (10, 10, 10, 10, 20, 10, 10, 10, 10, 10)
_SENTINEL = "\x01fuzz-sentinel\x01"


@dataclass
class Known:
    """Names the repository uses, for ``wrong_id`` (each kind: a sorted list)."""

    ids: dict[str, list[str]] = field(default_factory=dict)
    sandbox: str = "/nonexistent"


@dataclass
class Mutation:
    kind: str
    data: bytes | None  # None: the object is removed
    detail: str

    def describe(self) -> str:
        return f"{self.kind}: {self.detail}"


def mutate(data: bytes, rng: random.Random, known: Known, blobs: list[bytes] = ()) -> Mutation:
    """One mutation of ``data``: JSON-level for JSON documents 60% of the time."""
    doc = _parse(data)
    if doc is not _NOT_JSON and rng.random() < 0.6:
        return _json_mutation(doc, rng, known)
    kind = rng.choice((*BYTE_KINDS, "blob_swap") if blobs else BYTE_KINDS)
    return _byte_mutation(kind, data, rng, blobs)


# -- bytes -------------------------------------------------------------------------
def _byte_mutation(kind: str, data: bytes, rng: random.Random, blobs: list[bytes]) -> Mutation:
    n = len(data)
    if kind == "bitflip" and n:
        out = bytearray(data)
        flips = rng.choice((1, 1, 1, 2, 3, 8))
        where = sorted(rng.randrange(n * 8) for _ in range(flips))
        for bit in where:
            out[bit // 8] ^= 1 << (bit % 8)
        return Mutation(kind, bytes(out), f"{flips} bit(s) at bits {where} of {n} bytes")
    if kind == "truncate" and n:
        keep = rng.choice((0, 1, n // 2, n - 1, rng.randrange(n)))
        return Mutation(kind, data[:keep], f"to {keep} of {n} bytes")
    if kind == "extend":
        how = rng.choice(("random", "zeros", "repeat", "json"))
        extra = {
            "random": lambda: rng.randbytes(rng.choice((1, 7, 100, 4096))),
            "zeros": lambda: bytes(rng.choice((1, 64, 65536))),
            "repeat": lambda: data,
            "json": lambda: b'{"format": 2}',
        }[how]()
        return Mutation(kind, data + extra, f"+{len(extra)} {how} bytes after {n}")
    if kind == "splice" and n:
        start = rng.randrange(n)
        length = min(n - start, rng.choice((1, 4, 16, 256)))
        return Mutation(
            kind,
            data[:start] + rng.randbytes(length) + data[start + length :],
            f"{length} random bytes at {start} of {n}",
        )
    if kind == "garbage":
        size = rng.choice((1, n or 1, 2 * n + 1))
        return Mutation(kind, rng.randbytes(size), f"{size} random bytes for {n}")
    if kind == "blob_swap" and blobs:
        other = rng.choice(blobs)
        return Mutation(kind, other, f"another blob's {len(other)} bytes for {n}")
    if kind == "delete":
        return Mutation(kind, None, "object removed")
    return Mutation("empty", b"", f"0 bytes for {n}")


# -- JSON ----------------------------------------------------------------------------
_NOT_JSON = object()


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _nodes(doc: Any) -> list[tuple[Any, ...]]:
    """Every node's path (keys and indices from the root), the root first."""
    found: list[tuple[Any, ...]] = []
    stack: list[tuple[tuple[Any, ...], Any]] = [((), doc)]
    while stack:
        path, node = stack.pop()
        found.append(path)
        if isinstance(node, dict):
            stack.extend(((*path, k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(node))))
    return found


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    _get(doc, path[:-1])[path[-1]] = value
    return doc


def _pick(rng: random.Random, paths: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """A node: a shallow one a third of the time (the fields every reader looks at first),
    else any."""
    shallow = [p for p in paths if len(p) <= 2]
    return rng.choice(shallow if shallow and rng.random() < 0.35 else paths)


def _dumps(doc: Any) -> str:
    return json.dumps(doc, allow_nan=True)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} chars)"


def _type_values(current: Any) -> list[Any]:
    values = [0, 7, -3, "x", "", "7", [], [1], ["a"], {}, {"a": 1}, None, True, False, 0.5]
    return [v for v in values if type(v) is not type(current) or v != current]


def _json_mutation(doc: Any, rng: random.Random, known: Known) -> Mutation:
    kind = rng.choices(JSON_KINDS, JSON_WEIGHTS)[0]
    paths = _nodes(doc)
    if kind == "type_swap":
        path = _pick(rng, paths)
        value = rng.choice(_type_values(_get(doc, path)))
        return _replaced(kind, doc, path, value)
    if kind == "huge_number":
        numeric = [p for p in paths if _is_number(_get(doc, p))]
        path = _pick(rng, numeric or paths)
        return _replaced(kind, doc, path, rng.choice(HUGE))
    if kind == "deep_nesting":
        path = rng.choice(((),) * 1 + (_pick(rng, paths),) * 4)
        depth = rng.choice(DEPTHS)
        opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
        text = _dumps(_set(doc, path, _SENTINEL)).replace(
            json.dumps(_SENTINEL), opener * depth + "1" + closer * depth, 1
        )
        return Mutation(kind, text.encode(), f"{depth} levels of {opener} at {_where(path)}")
    if kind == "path_string":
        strings = [p for p in paths if isinstance(_get(doc, p), str)]
        leaves = [p for p in paths if not isinstance(_get(doc, p), (dict, list))]
        path = _pick(rng, strings if strings and rng.random() < 0.5 else leaves or paths)
        value = rng.choice(PATH_STRINGS).replace("{sandbox}", known.sandbox)
        return _replaced(kind, doc, path, value)
    if kind == "traversal":
        leaves = [p for p in paths if not isinstance(_get(doc, p), (dict, list))]
        named = [p for p in leaves if p and (p[-1] in NAMING or p[-1] == 0)]
        path = rng.choice(named if named and rng.random() < 0.7 else leaves or paths)
        value = rng.choice(TRAVERSALS).replace("{sandbox}", known.sandbox)
        return _replaced(kind, doc, path, value)
    if kind == "remove_key":
        members = [p for p in paths if p]
        if not members:
            return _replaced("type_swap", doc, (), {})
        path = _pick(rng, members)
        parent = _get(doc, path[:-1])
        del parent[path[-1]]
        return Mutation(kind, _dumps(doc).encode(), f"removed {_where(path)}")
    if kind == "duplicate_key":
        keyed = [p for p in paths if p and isinstance(_get(doc, p[:-1]), dict)]
        if not keyed:
            return _replaced("type_swap", doc, (), {"a": 1, "b": [1]})
        path = _pick(rng, keyed)
        original = _get(doc, path)
        other = rng.choice(_type_values(original))
        pair = [json.dumps(original), json.dumps(other)]
        rng.shuffle(pair)
        name = json.dumps(path[-1])
        text = _dumps(_set(doc, path, _SENTINEL)).replace(
            f"{name}: {json.dumps(_SENTINEL)}", f"{name}: {pair[0]}, {name}: {pair[1]}", 1
        )
        return Mutation(
            kind, text.encode(), f"{_where(path)} twice: {pair[0]:.40}, then {pair[1]:.40}"
        )
    if kind == "wrong_id":
        return _wrong_id(doc, paths, rng, known)
    if kind == "number_tweak":
        numeric = [p for p in paths if _is_number(_get(doc, p))]
        if not numeric:
            return _replaced("type_swap", doc, _pick(rng, paths), 1)
        path = _pick(rng, numeric)
        value = _get(doc, path)
        swapped = (
            float(value)
            if isinstance(value, int) and abs(value) < 2**53
            else (int(value) if isinstance(value, float) and math.isfinite(value) else 0)
        )
        tweaks = [value + 1, value - 1, -value, value * 2, swapped]
        return _replaced(kind, doc, path, rng.choice(tweaks))
    # swap_items: two elements of one list, or two values of one object
    containers = [
        p for p in paths if isinstance(_get(doc, p), (list, dict)) and len(_get(doc, p)) > 1
    ]
    if not containers:
        return _replaced("type_swap", doc, _pick(rng, paths), [])
    path = _pick(rng, containers)
    node = _get(doc, path)
    keys = list(range(len(node))) if isinstance(node, list) else list(node)
    a, b = rng.sample(keys, 2)
    node[a], node[b] = node[b], node[a]
    return Mutation(
        "swap_items", _dumps(doc).encode(), f"swapped [{a!r}] and [{b!r}] of {_where(path)}"
    )


def _wrong_id(doc: Any, paths: list[tuple[Any, ...]], rng: random.Random, known: Known) -> Mutation:
    by_value = {v: kind for kind, values in known.ids.items() for v in values}
    named = [p for p in paths if isinstance(_get(doc, p), str) and _get(doc, p) in by_value]
    keys = [p for p in paths if p and isinstance(p[-1], str) and p[-1] in by_value]
    if not named and not keys:
        return _replaced("type_swap", doc, _pick(rng, paths), "0" * 32)
    if keys and (not named or rng.random() < 0.3):  # a dict key naming something
        path = rng.choice(keys)
        parent = _get(doc, path[:-1])
        new = _other_id(path[-1], by_value[path[-1]], rng, known)
        parent[new] = parent.pop(path[-1])
        return Mutation(
            "wrong_id", _dumps(doc).encode(), f"key {_where(path)} renamed {_short(new)}"
        )
    path = rng.choice(named)
    old = _get(doc, path)
    return _replaced("wrong_id", doc, path, _other_id(old, by_value[old], rng, known))


def _other_id(old: str, kind: str, rng: random.Random, known: Known) -> str:
    same = [v for v in known.ids[kind] if v != old]
    others = [v for k, vs in known.ids.items() if k != kind for v in vs]
    choices = [
        lambda: rng.choice(same) if same else old + "0",  # another existing one
        lambda: rng.choice(others) if others else "main",  # one of another kind
        lambda: old[:-4] + "".join(rng.choice("0123456789abcdef") for _ in range(4)),  # absent
        lambda: old.upper(),
        lambda: old + "/../" + old,
    ]
    return rng.choice(choices)()


def _replaced(kind: str, doc: Any, path: tuple[Any, ...], value: Any) -> Mutation:
    old = _get(doc, path)
    text = _dumps(_set(doc, path, value))
    return Mutation(kind, text.encode(), f"{_where(path)}: {_short(old)} -> {_short(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _where(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path) or "the document"


def kinds() -> Iterator[str]:
    yield from BYTE_KINDS
    yield "blob_swap"
    yield from JSON_KINDS
