"""Restore's fallback: the newest version that loads, passing over those that do not
verify or do not fit (used by the manager and the Hugging Face resume)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from cloudckpt.errors import CorruptCheckpoint
from cloudckpt.versions import Version

log = logging.getLogger("cloudckpt")
T = TypeVar("T")


def first_good(
    candidates: Iterable[Version], attempt: Callable[[Version], T], where: str
) -> tuple[Version, T, dict[str, str]]:
    """The first candidate (newest first) that ``attempt`` loads without CorruptCheckpoint,
    what it returned, and version id -> why for each candidate skipped before it."""
    skipped: dict[str, str] = {}
    for candidate in candidates:
        try:
            return candidate, attempt(candidate), skipped
        except CorruptCheckpoint as e:
            log.error("version %s does not verify (%s); trying its parent", candidate.id, e)
            skipped[candidate.id] = str(e)
    reasons = "; ".join(f"{vid}: {why[:200]}" for vid, why in skipped.items())
    raise CorruptCheckpoint(f"{where}: no version verifies ({reasons or 'none left'})")
