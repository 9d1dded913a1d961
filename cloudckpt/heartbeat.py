"""Renewing a time-limited claim from a background thread (writer leases, gc sweeps).

The thread holds its claim weakly: a claim dropped without being stopped stops renewing.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Protocol

from cloudckpt.errors import CloudCkptError

log = logging.getLogger("cloudckpt")


class Renewable(Protocol):
    """A claim renewed every ``ttl``/3 seconds until it is lost."""

    ttl: float

    @property
    def lost(self) -> str | None: ...

    def renew(self) -> None: ...


def start(claim: Renewable, stop: threading.Event, name: str) -> threading.Thread:
    """A daemon thread calling ``claim.renew()`` every ttl/3 until ``stop`` is set, the
    claim is lost, or nothing else holds it. A failed renewal is logged and retried: the
    claim lasts its ttl, and its owner's guard decides when that is over."""
    thread = threading.Thread(
        target=_beat, args=(weakref.ref(claim), stop, name), name=name, daemon=True
    )
    thread.start()
    return thread


def _beat(ref: weakref.ref[Renewable], stop: threading.Event, name: str) -> None:
    while (claim := ref()) is not None and claim.lost is None:
        interval, claim = claim.ttl / 3, None
        if stop.wait(interval) or (claim := ref()) is None:
            return
        try:
            claim.renew()
        except CloudCkptError as e:
            log.warning("%s could not renew: %s", name, e)
        claim = None
