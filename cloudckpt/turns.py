"""Whose turn it is: commits waiting for collections, and collections yielding to them.

A commit that a garbage collection held up (one was sweeping, or started since the
commit's blobs were known) must wait for every sweep to end and check its blobs before
it may publish. With collections running back to back, a new one could register its
sweep in each gap before the commit's check was done, and the commit would never get
through. So a held-up commit *takes a turn*: it adds an entry to ``versions.json``'s
waiting commits (renewed every ttl/3 from a thread, removed by its own publishing swap)
and a collection does not register its sweep while a live one is there; it waits, at
most :data:`MAX_DEFERENCE`. An entry whose renewal counter stood still for its ttl, by
the collection's own monotonic clock, is dead (the commit was killed or frozen) and is
dropped. Safety never rests on this: it is the epoch check of ``cloudckpt.commit``
that keeps a sweep from deleting a published version's blobs; turns only make waiting
fair. An older release ignores the entries (and drops them when it writes).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping

from cloudckpt import heartbeat, versions
from cloudckpt.errors import CloudCkptError, CommitConflict
from cloudckpt.store import Store
from cloudckpt.versions import Index, Sweep

log = logging.getLogger("cloudckpt")

#: A waiting commit's entry is dead once its renewal counter stood still this long.
TURN_TTL = 60.0
#: A collection yields to waiting commits for at most this long, then sweeps anyway.
MAX_DEFERENCE = 600.0
#: While waiting for a sweep, say so this often (seconds).
_SAY_EVERY = 30.0


class Renewals:
    """When each renewed entry (a sweep, a waiting commit) last changed, by this
    process's monotonic clock: one whose counter stood still for its ttl is dead."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}

    def dead(
        self, entries: Mapping[str, Sweep], now: float, most: float | None = None
    ) -> dict[str, int]:
        """The entries dead at ``now``, with the counter they died at; an entry's ttl
        counts as at most ``most`` seconds where given."""
        dead = {}
        for token, entry in entries.items():
            seq, since = self._seen.get(token, (-1, now))
            ttl = entry.ttl if most is None else min(entry.ttl, most)
            if seq != entry.seq:
                self._seen[token] = (entry.seq, now)
            elif now - since > ttl:
                dead[token] = entry.seq
        return dead


def drop_dead(entries: dict[str, Sweep], dead: Mapping[str, int]) -> bool:
    """Remove the dead entries that are still as they were seen; True if any went."""
    gone = [t for t, seq in dead.items() if t in entries and entries[t].seq == seq]
    for token in gone:
        del entries[token]
    return bool(gone)


def wait_for_sweeps(store: Store, timeout: float = 3600.0) -> int:
    """Wait until no garbage collection is sweeping; returns the gc epoch then.

    A sweep whose renewal counter stood still for its ttl -- measured on this machine's
    monotonic clock from when this process first saw that value -- is dead (killed or
    frozen; a frozen one checks its own deadline before deleting) and is removed.
    """
    renewals = Renewals()
    started = time.monotonic()
    deadline, said = started + timeout, started - _SAY_EVERY
    while True:
        index = versions.read(store)[0]
        if not index.sweeps:
            if said > started:
                log.info("the garbage collection ended; this commit goes on")
            return index.gc_epoch
        now = time.monotonic()
        if now - said >= _SAY_EVERY:
            said = now
            log.info(
                "waiting for %d garbage collection sweep(s) on %s to end before publishing "
                "(%.0fs so far; a sweep that stops renewing is dead after its ttl, at most "
                "%.0fs)",
                len(index.sweeps),
                store.uri,
                now - started,
                max(s.ttl for s in index.sweeps.values()),
            )
        dead = renewals.dead(index.sweeps, now)
        if dead:
            log.warning(
                "garbage collection sweeps %s were not renewed within their ttl; "
                "treating them as dead",
                ", ".join(dead),
            )
            versions.update(store, lambda ix, dead=dead: drop_dead(ix.sweeps, dead))
            continue
        if now > deadline:
            raise CommitConflict(
                f"{store.url(versions.KEY)}: garbage collection has been sweeping for over "
                f"{timeout:.0f}s; commit again later"
            )
        time.sleep(min(1.0, min(s.ttl for s in index.sweeps.values()) / 20))


class Turn:
    """A held-up commit's place in ``versions.json``'s waiting commits (see the module
    docstring): taken when first needed, renewed while held, removed by the commit's
    publishing swap (:meth:`leave`) or, if it gives up, when the turn is closed."""

    def __init__(self, store: Store, ttl: float = TURN_TTL) -> None:
        self.store, self.ttl = store, ttl
        self.token = f"commit-{secrets.token_hex(6)}"
        self._held = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> None:
        """Enter the waiting commits, unless this turn is held and alive; a turn that was
        dropped (this process was frozen past its ttl) is taken again."""
        if self._held and self._lost is None:
            return
        self._stop_renewing()
        self._lost = None
        versions.update(self.store, self._enter)
        self._held = True
        self._thread = heartbeat.start(self, self._stop, "cloudckpt-turn")

    def leave(self, index: Index) -> None:
        """Remove the entry in ``index`` (the commit's publishing swap applies it)."""
        index.waiting.pop(self.token, None)

    def left(self) -> None:
        """The swap that applied :meth:`leave` landed: closing has nothing to remove."""
        self._held = False

    @property
    def lost(self) -> str | None:
        return self._lost

    def renew(self) -> None:
        def bump(ix: Index) -> bool:
            entry = ix.waiting.get(self.token)
            if entry is None:  # published, withdrawn, or dropped as dead: never re-enter
                self._lost = "gone"
                return False
            ix.waiting[self.token] = Sweep(entry.seq + 1, entry.ttl)
            return True

        versions.update(self.store, bump)

    def close(self) -> None:
        """Stop renewing; remove the entry if the commit did not publish."""
        self._stop_renewing()
        if self._held:
            self._held = False
            with contextlib.suppress(CloudCkptError):
                versions.update(self.store, lambda ix: ix.waiting.pop(self.token, None) is not None)

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self._stop = threading.Event()

    def _enter(self, ix: Index) -> None:
        ix.waiting[self.token] = Sweep(0, self.ttl)


class Deference:
    """A collection's patience with waiting commits: :meth:`check` runs inside the swap
    that registers its sweep, and raises :class:`CommitsWaiting` while a live commit
    waits (dropping dead ones), for at most ``patience`` seconds in all."""

    def __init__(self, patience: float = MAX_DEFERENCE) -> None:
        self.renewals = Renewals()
        self.deadline = time.monotonic() + patience

    def check(self, index: Index) -> None:
        now = time.monotonic()
        # Commits of this release renew every TURN_TTL/3: a longer ttl (another writer's)
        # is not waited out.
        dead = self.renewals.dead(index.waiting, now, TURN_TTL)
        if drop_dead(index.waiting, dead):
            log.warning("commits %s waited without renewing; treating them as dead", list(dead))
        if index.waiting and now < self.deadline:
            raise CommitsWaiting(len(index.waiting))


class CommitsWaiting(Exception):
    """Commits wait to publish: the collection lets them go first."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} commits wait to publish")
        self.count = count


def after_waiting_commits(store: Store, change: Callable[[Index], None], patience: float) -> Index:
    """Swap ``change`` into the index once no live commit waits (or ``patience`` seconds
    have passed): how a collection registers its sweep."""
    deference = Deference(patience)
    pause = 0.01
    while True:

        def apply(ix: Index) -> None:
            deference.check(ix)
            change(ix)

        try:
            return versions.update(store, apply)
        except CommitsWaiting:
            time.sleep(pause)
            pause = min(1.0, pause * 2)
