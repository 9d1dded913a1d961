"""A writer lease per branch: one job commits to a branch at a time.

The lease is an object (``leases/<branch>.json``) naming its holder -- host, pid, start
time -- created if absent and renewed by compare-and-swap from a background thread. A
second job on the same branch fails fast with :class:`LeaseHeld`, naming the first. A
lease is free again when its holder releases it (``close()``), when it was not renewed
for ``ttl`` seconds (a machine that vanished), or at once when its holder was a process
of this host that no longer exists (a local kill). Jobs on different branches hold
different leases and run side by side.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from dataclasses import asdict, dataclass

from cloudckpt.errors import CheckpointNotFound, LeaseHeld, PreconditionFailed, StoreError
from cloudckpt.store import Store

log = logging.getLogger("cloudckpt")


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    renewed: float
    token: str

    def describe(self) -> str:
        since = _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc)
        return f"pid {self.pid} on host {self.host!r}, started {since:%Y-%m-%d %H:%M:%S} UTC"


class WriterLease:
    """The exclusive right of this process to commit to ``branch`` of the repo at ``store``."""

    def __init__(self, store: Store, branch: str, ttl: float = 60.0) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.store, self.branch, self.ttl = store, branch, ttl
        self.key = f"leases/{branch}.json"
        now = time.time()
        self.me = Holder(socket.gethostname(), os.getpid(), now, now, secrets.token_hex(8))
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._etag is not None and self._lost is None

    def acquire(self) -> WriterLease:
        """Take the lease, or raise LeaseHeld naming its live holder."""
        for _ in range(16):  # lost races with other acquirers
            found = self.store.read_versioned(self.key)
            if found is None:
                if self.store.put_if_absent(self.key, self._doc(time.time())):
                    self._etag = self.store.read_versioned(self.key)[1]  # type: ignore[index]
                    break
                continue
            holder = _parse(found[0])
            if holder is not None and holder.token == self.me.token:
                self._etag = found[1]
                break
            if holder is not None and not self._stale(holder):
                age = time.time() - holder.renewed
                raise LeaseHeld(
                    f"{self.store.url(self.key)}: branch {self.branch!r} is being written by "
                    f"{holder.describe()} (renewed {age:.0f}s ago). Use another branch, stop "
                    f"that job, or wait {max(self.ttl - age, 0):.0f}s for its lease to expire "
                    "if it is gone."
                )
            if holder is None:
                why = "unreadable"
            elif holder.pid == self.me.pid and holder.host == self.me.host:
                why = "from an earlier manager in this process"
            else:
                why = f"stale: {holder.describe()}"
            try:
                self._etag = self.store.put_if_match(self.key, self._doc(time.time()), found[1])
                log.warning("took over the writer lease of %s (%s)", self.branch, why)
                break
            except PreconditionFailed:
                continue
        else:
            raise LeaseHeld(f"{self.store.url(self.key)}: too many jobs racing for the lease")
        # The thread holds the lease weakly: a lease dropped without release() stops it.
        self._thread = threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop),
                                        name="cloudckpt-lease", daemon=True)  # fmt: skip
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise LeaseHeld if another job took the lease from this one (one GET)."""
        if self._lost is None:
            found = self.store.read_versioned(self.key)
            holder = _parse(found[0]) if found else None
            if holder is not None and holder.token == self.me.token:
                self._etag = found[1]  # type: ignore[index]
            elif found is None and self.store.put_if_absent(self.key, self._doc(time.time())):
                self._etag = self.store.read_versioned(self.key)[1]  # type: ignore[index]
            else:
                self._lose(holder)
        if self._lost:
            raise LeaseHeld(self._lost)

    def renew(self) -> None:
        try:
            self._etag = self.store.put_if_match(self.key, self._doc(time.time()), self._etag)
        except PreconditionFailed:
            found = self.store.read_versioned(self.key)
            holder = _parse(found[0]) if found else None
            if holder is not None and holder.token == self.me.token:
                self._etag = found[1]  # type: ignore[index]  # our own renewal, response lost
                return
            self._lose(holder)

    def _lose(self, holder: Holder | None) -> None:
        who = holder.describe() if holder else "nobody"
        self._lost = (
            f"{self.store.url(self.key)}: this job lost its writer lease on branch "
            f"{self.branch!r} (now held by {who}); stop one of the two jobs"
        )
        log.error("%s", self._lost)

    def release(self) -> None:
        """Give the lease up (a no-op if it is not held)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self.held:
            found = self.store.read_versioned(self.key)
            if found and (h := _parse(found[0])) is not None and h.token == self.me.token:
                with contextlib.suppress(CheckpointNotFound):
                    self.store.delete([self.key])
        self._etag = None

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _stale(self, holder: Holder) -> bool:
        """Expired, or held by a process of this host that is gone -- or by this very
        process (a second manager here takes over; the first can no longer save)."""
        if time.time() - holder.renewed > self.ttl:
            return True
        if holder.host != self.me.host:
            return False
        return holder.pid == self.me.pid or not _alive(holder.pid)

    def _doc(self, now: float) -> bytes:
        holder = Holder(self.me.host, self.me.pid, self.me.started, now, self.me.token)
        return json.dumps({**asdict(holder), "ttl": self.ttl, "branch": self.branch}).encode()


def _heartbeat(ref: weakref.ref[WriterLease], stop: threading.Event) -> None:
    while (lease := ref()) is not None and lease._lost is None:
        interval, lease = lease.ttl / 3, None
        if stop.wait(interval) or (lease := ref()) is None:
            return
        try:
            lease.renew()
        except StoreError as e:  # keep trying: the lease lasts ttl
            log.warning("could not renew the writer lease of %s: %s", lease.branch, e)
        lease = None


def _parse(data: bytes) -> Holder | None:
    try:
        doc = json.loads(data)
        return Holder(str(doc["host"]), int(doc["pid"]), float(doc["started"]),
                      float(doc["renewed"]), str(doc["token"]))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
