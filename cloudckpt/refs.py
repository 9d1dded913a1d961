"""Refs as a person types them, like ``git rev-parse``: abbreviated version ids and
``REF~N`` / ``REF^`` ancestors, on top of the exact names :meth:`Repo.resolve` takes."""

from __future__ import annotations

import re
from collections.abc import Callable

from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint
from cloudckpt.versions import Index, Version

#: The fewest characters of a version id taken as an abbreviation.
MIN_ABBREV = 4
#: How many candidates an ambiguous abbreviation's error lists.
SHOWN = 20
_ANCESTRY = re.compile(r"(.+?)((?:~\d*|\^)+)")
_HOP = re.compile(r"~\d*|\^")
#: The ref naming the newest version of any branch.
LATEST = "latest"


def rev_parse(index: Index, ref: str, resolve: Callable[[str], Version], where: str) -> Version:
    """The version ``ref`` names in ``index``: an exact name (``resolve(name)``: a
    branch, tag, version id or ``"latest"``) first; else a unique abbreviation of a
    version id (at least :data:`MIN_ABBREV` characters: a prefix of the id, or of its
    random part after the last ``-``); either followed by ``~N`` (the N-th ancestor,
    ``~`` alone the first) or ``^`` (the parent), repeatable: ``main~2^``.

    Raises CheckpointNotFound when nothing matches, when an abbreviation is ambiguous
    (naming the candidates), and when the ancestry goes past the first version or
    reaches a deleted one. ``where`` names the repository in errors."""
    if _exact(index, ref):
        return resolve(ref)
    match = _ANCESTRY.fullmatch(ref)
    base, hops = (match[1], match[2]) if match else (ref, "")
    if _exact(index, base):
        found = resolve(base)
    else:
        found = _abbreviation(index, base, where) or resolve(ref)  # resolve raises
    steps = sum(int(hop[1:] or 1) for hop in _HOP.findall(hops))
    if steps > len(index.versions):  # more ancestors than versions: none is that far back
        raise CheckpointNotFound(f"{where}: {ref!r} goes past the first version")
    seen = {found.id}
    for _ in range(steps):
        if found.parent is None:
            raise CheckpointNotFound(f"{where}: {ref!r} goes past {found.id}, the first version")
        if found.parent not in index.versions:
            raise CheckpointNotFound(f"{where}: {ref!r} reaches {found.parent}, which was deleted")
        if found.parent in seen:  # only a hostile or damaged index has a parent cycle
            raise CorruptCheckpoint(
                f"{where}: the parents of {found.id} lead back to it (a damaged versions.json)"
            )
        found = index.versions[found.parent]
        seen.add(found.id)
    return found


def _exact(index: Index, name: str) -> bool:
    return name == LATEST or name in index.branches or name in index.tags or name in index.versions


def abbreviates(index: Index, name: str) -> str | None:
    """The id of a version ``name`` would abbreviate if it were not a branch or tag."""
    found = _matching(index, name) if len(name) >= MIN_ABBREV else []
    return found[0].id if found else None


def _matching(index: Index, prefix: str) -> list[Version]:
    return [
        v
        for vid, v in index.versions.items()
        if vid.startswith(prefix) or vid.rpartition("-")[2].startswith(prefix)
    ]


def _abbreviation(index: Index, prefix: str, where: str) -> Version | None:
    if len(prefix) < MIN_ABBREV:
        return None
    candidates = _matching(index, prefix)
    if len(candidates) > 1:
        listed = "\n".join(f"  {v.id}  {v.branch}  step {v.step}" for v in candidates[:SHOWN])
        more = f"\n  ... and {len(candidates) - SHOWN} more" if len(candidates) > SHOWN else ""
        raise CheckpointNotFound(
            f"{where}: {prefix!r} is ambiguous; {len(candidates)} versions match:\n{listed}{more}"
        )
    return candidates[0] if candidates else None
