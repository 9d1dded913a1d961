"""Checks for everything read from the store: JSON documents, ids, names and typed fields.

Anyone who can write to the bucket can put arbitrary bytes there, so nothing read back
is trusted: documents are parsed with a size and depth bound, every field is checked for
its type and range, and ids and names are refused (not sanitised) unless they are
plain. A failed check raises :class:`Invalid`, which the reader of the object turns into
``CorruptCheckpoint`` naming the object (:func:`document` does it for whole documents).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from cloudckpt.errors import CorruptCheckpoint

T = TypeVar("T")

#: Nesting depth of a stored JSON document (a state's skeleton nests three JSON levels
#: per level of the user's state: ``{"dict": [[key, value], ...]}``).
MAX_DEPTH = 200
#: The largest stored JSON document read (parsing takes several times its size in
#: memory): a versions.json of ~400,000 versions, a manifest of ~1,000,000 arrays.
MAX_DOCUMENT = 256 << 20
#: Largest integer a stored count, size, step or fencing token may hold: far beyond any
#: real value, and one increment of it is still a 64-bit integer.
MAX_INT = 2**62
#: Version ids: what :func:`cloudckpt.commit.new_version_id` makes, and nothing that
#: could name another object (no ``/``, no leading dot).
VID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID = re.compile(VID_PATTERN)
_DIGEST = re.compile(r"[0-9a-f]{32}")
_NAME_MAX = 200


class Invalid(ValueError):
    """A stored value is not what its field must hold (the message says which)."""


def document(data: bytes | memoryview, where: str) -> Any:
    """Parse a stored JSON document; CorruptCheckpoint naming ``where`` if it is not
    valid UTF-8 JSON or nests deeper than :data:`MAX_DEPTH`."""
    try:
        return parse_json(data)
    except Invalid as e:  # "not valid JSON (...)", "nested deeper than ..."
        raise CorruptCheckpoint(f"{where} is {e}") from None


def parse_json(data: bytes | memoryview) -> Any:
    """Parse JSON; Invalid if it is larger than :data:`MAX_DOCUMENT`, not valid UTF-8
    JSON, or nests deeper than :data:`MAX_DEPTH`."""
    if len(data) > MAX_DOCUMENT:
        raise Invalid(f"larger than {MAX_DOCUMENT >> 20} MiB ({len(data)} bytes)")
    try:
        doc = json.loads(bytes(data))
    except (ValueError, RecursionError) as e:
        raise Invalid(f"not valid JSON ({str(e)[:200]})") from None
    check_depth(doc)
    return doc


def check_depth(doc: Any, limit: int = MAX_DEPTH) -> None:
    """Raise Invalid if ``doc`` nests lists and dicts deeper than ``limit``."""
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth >= limit:
                raise Invalid(f"nested deeper than {limit} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


# -- scalar fields ------------------------------------------------------------------
def integer(value: Any, lo: int = -MAX_INT, hi: int = MAX_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise Invalid(f"{value!r:.60} is not an integer in [{lo}, {hi}]")
    return value


def count(value: Any) -> int:
    """A non-negative integer (sizes, counters, fencing tokens)."""
    return integer(value, 0)


def number(value: Any) -> float:
    """A finite JSON number."""
    found = metric(value)
    if not math.isfinite(found):
        raise Invalid(f"{value!r:.60} is not a finite number")
    return found


#: The latest time a stored timestamp may name (the end of year 9999).
MAX_TIME = 253402300799.0


def timestamp(value: Any) -> float:
    """Seconds since the epoch, before the year 10000."""
    found = number(value)
    if not 0 <= found <= MAX_TIME:
        raise Invalid(f"{value!r:.60} is not a time")
    return found


def format_of(doc: Any, reads: tuple[int, ...]) -> int | None:
    """A document's ``format`` if it is one of ``reads`` (a JSON integer, not ``true``
    or ``2.0``), else None."""
    found = doc.get("format") if isinstance(doc, dict) else None
    return found if type(found) is int and found in reads else None


def metric(value: Any) -> float:
    """A JSON number; NaN and infinities allowed (a diverged loss is recorded as is)."""
    if type(value) not in (int, float):
        raise Invalid(f"{value!r:.60} is not a number")
    try:
        return float(value)
    except OverflowError:  # a JSON integer past the range of a double
        raise Invalid(f"{value!r:.60} is out of range") from None


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{value!r:.60} is not a string")
    return value


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{value!r:.60} is not true or false")
    return value


def vid(value: Any) -> str:
    """A version id: letters, digits, ``.``, ``_`` and ``-``, starting with a letter or
    digit, at most 128 characters."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise Invalid(f"{value!r:.60} is not a version id")
    return value


def digest(value: Any) -> str:
    """A content hash: 32 lowercase hex digits (xxh3-128)."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise Invalid(f"{value!r:.60} is not a content hash")
    return value


def name(value: Any) -> str:
    """A branch or tag name: printable, no whitespace, at most 200 characters; ``/``
    separates non-empty segments other than ``.`` and ``..`` (a name is part of object
    keys such as ``leases/<branch>.json``)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= _NAME_MAX
        or not value.isprintable()
        or any(c.isspace() or c == "\\" for c in value)
        or any(part in ("", ".", "..") for part in value.split("/"))
    ):
        raise Invalid(
            f"{value!r:.60} is not a valid branch or tag name (printable, no whitespace or "
            "backslash, no empty, '.' or '..' segment between slashes, at most "
            f"{_NAME_MAX} characters)"
        )
    return value


#: Characters a new branch or tag name may not hold: ref syntax (``main~2``, ``main^``).
REF_SYNTAX = frozenset("~^:")


def new_name(value: Any) -> str:
    """A name for a new branch or tag: :func:`name`, without the characters of ref syntax
    (names read from an existing index are only held to :func:`name`)."""
    found = name(value)
    if REF_SYNTAX & set(found):
        raise Invalid(
            f"{found!r} cannot name a new branch or tag: '~', '^' and ':' are ref syntax "
            "(main~2 is main's grandparent)"
        )
    return found


def plain(value: Any) -> Any:
    """Any JSON value (user data such as ``meta``), depth-bounded."""
    check_depth(value)
    return value


# -- combinators --------------------------------------------------------------------
def optional(check: Callable[[Any], T]) -> Callable[[Any], T | None]:
    def checked(value: Any) -> T | None:
        return None if value is None else check(value)

    return checked


def mapping(key: Callable[[Any], str], value: Callable[[Any], T]) -> Callable[[Any], dict[str, T]]:
    def checked(doc: Any) -> dict[str, T]:
        if not isinstance(doc, dict):
            raise Invalid(f"{doc!r:.60} is not an object")
        return {key(k): _at(k, value, v) for k, v in doc.items()}

    return checked


def listing(item: Callable[[Any], T]) -> Callable[[Any], list[T]]:
    def checked(doc: Any) -> list[T]:
        if not isinstance(doc, list):
            raise Invalid(f"{doc!r:.60} is not a list")
        return [_at(i, item, v) for i, v in enumerate(doc)]

    return checked


def fields(doc: Any, checks: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """The fields of object ``doc`` that ``checks`` names, each checked (absent ones are
    left out; unknown ones ignored: a newer writer may add fields)."""
    if not isinstance(doc, dict):
        raise Invalid(f"{doc!r:.60} is not an object")
    return {k: _at(k, check, doc[k]) for k, check in checks.items() if k in doc}


def _at(where: object, check: Callable[[Any], T], value: Any) -> T:
    try:
        return check(value)
    except Invalid as e:
        raise Invalid(f"{where!s:.60}: {e}") from None
