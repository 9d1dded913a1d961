"""A writer lease per branch: one job commits to a branch at a time.

The lease is an object (``leases/<branch>.json``) naming its holder -- host, pid, start
time -- created if absent and renewed by compare-and-swap from a background thread. A
second job on the same branch fails fast with :class:`LeaseHeld`, naming the first. A
lease is free again when its holder releases it (``close()``), when it was not renewed
for the holder's own ``ttl`` by the store's clock (a machine that vanished), or at once
when its holder was a process of this machine -- same boot, same pid namespace, same
process start time -- that no longer exists (a local kill). Jobs on different branches
hold different leases and run side by side.

The lease alone cannot stop a job that was frozen and wakes up after losing it; the
fencing token can: each new holder raises the branch's token in ``versions.json``, and
a commit carrying an older one is refused (docs/protocol.md, I3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

from cloudckpt import heartbeat, schema, versions
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint, LeaseHeld, PreconditionFailed
from cloudckpt.store import Store

log = logging.getLogger("cloudckpt")

#: S3 gives object times and its Date header in whole seconds: an age measured from
#: them may be short by up to this much.
_CLOCK_RESOLUTION = 1.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lease. ``boot``, ``pidns`` and ``start`` (the process's start time in
    clock ticks since boot) identify the process beyond its pid: two containers share a
    host name but not a pid namespace, and a pid is reused after its process died."""

    host: str
    pid: int
    started: float
    token: str
    ttl: float
    boot: str = ""
    pidns: str = ""
    start: str = ""
    fence: int = 0
    #: Given up by its holder: free for the next job.
    released: bool = False

    def describe(self) -> str:
        since = _dt.datetime.fromtimestamp(self.started, _dt.timezone.utc)
        return f"pid {self.pid} on host {self.host!r}, started {since:%Y-%m-%d %H:%M:%S} UTC"

    def same_machine(self, other: Holder) -> bool:
        """Whether both run on one booted machine in one pid namespace (known for sure)."""
        ids = (self.host, self.boot, self.pidns)
        return all(ids) and ids == (other.host, other.boot, other.pidns)


class WriterLease:
    """The exclusive right of this process to commit to ``branch`` of the repo at ``store``.

    Taking it raises the branch's fencing token in ``versions.json``; commits carry
    :attr:`fence`, and a commit whose token is no longer the branch's is refused
    (FencedOut), however long its job was frozen.
    """

    def __init__(self, store: Store, branch: str, ttl: float = 60.0) -> None:
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"ttl must be in (0, {MAX_TTL:.0f}] seconds, not {ttl}")
        self.store, self.branch, self.ttl = store, branch, ttl
        self.key = f"leases/{branch}.json"
        pid = os.getpid()
        self.me = Holder(
            socket.gethostname(),
            pid,
            time.time(),
            secrets.token_hex(8),
            ttl,
            _boot_id(),
            _pid_namespace(),
            _start_ticks(pid),
        )
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._etag is not None and self._lost is None

    @property
    def lost(self) -> str | None:
        """Why this job lost the lease (None while it has not)."""
        return self._lost

    @property
    def fence(self) -> int:
        """This holder's fencing token (0 before :meth:`acquire`)."""
        return self.me.fence

    def acquire(self, force: bool = False, wait: bool = False) -> WriterLease:
        """Take the lease, or raise LeaseHeld naming its live holder.

        With ``wait`` (CheckpointManager's default), a holder on another machine (or one
        whose liveness cannot be checked here) is watched -- at most its own ttl, logged
        -- and taken over once its lease expires: a replacement machine after a hard
        kill resumes instead of failing. A holder that renews meanwhile, or a live
        process of this machine, raises LeaseHeld; without ``wait`` any live holder does.

        ``force`` takes it from a live holder too (an operator's decision: that job's
        next commit is refused, fenced out). A lease that was lost stays lost: a job
        that lost its branch to another must not take it back unawares."""
        if self._lost:
            raise LeaseHeld(self._lost)
        self.store.check_root()
        waited: str | None = None  # the token of the holder this job waited out once
        for _ in range(16):  # lost races with other acquirers
            found = self.store.read_versioned(self.key)
            if found is None:
                if self.store.put_if_absent(self.key, self._doc()):
                    self._etag = self.store.read_versioned(self.key)[1]  # type: ignore[index]
                    break
                continue
            holder = _parse(found[0])
            if holder is not None and holder.token == self.me.token:
                self._etag = found[1]
                break
            why = self._free(holder)
            if why is None and not force:
                assert holder is not None
                if not wait or waited == holder.token or self._known_alive(holder):
                    raise self._held(holder, renewed=waited == holder.token)
                self._wait_out(holder, found[1])
                waited = holder.token
                continue
            try:
                self._etag = self.store.put_if_match(self.key, self._doc(), found[1])
                log.warning("took over the writer lease of %s (%s)", self.branch, why or "forced")
                break
            except PreconditionFailed:
                continue
        else:
            raise LeaseHeld(f"{self.store.url(self.key)}: too many jobs racing for the lease")
        self._raise_fence()
        # The thread holds the lease weakly: a lease dropped without release() stops it.
        self._stop = threading.Event()  # a lease released before may be taken again
        self._thread = heartbeat.start(self, self._stop, f"cloudckpt-lease-{self.branch}")
        return self

    def _raise_fence(self) -> None:
        # Only while the lease is still ours, read after the index the swap is based on:
        # a holder that stalled between taking the lease and this swap must not raise the
        # token past the job that took the lease from it meanwhile.
        def bump(ix: versions.Index) -> None:
            found = self.store.read_versioned(self.key)
            holder = _parse(found[0]) if found else None
            if holder is None or holder.token != self.me.token:
                self._lose(holder)
                raise LeaseHeld(self._lost or "")
            fence = ix.fences.get(self.branch, 0) + 1
            if fence > schema.MAX_INT:  # only a hostile write gets here
                raise CorruptCheckpoint(
                    f"{self.store.url(versions.KEY)}: the fencing token of branch "
                    f"{self.branch!r} is at its maximum; `repair` rebuilds the index"
                )
            ix.fences[self.branch] = fence
            self.me = dataclasses.replace(self.me, fence=fence)

        versions.update(self.store, bump)
        self.renew()  # record the token in the lease object too (repair reads it)
        if self._lost:
            raise LeaseHeld(self._lost)

    def check(self) -> None:
        """Raise LeaseHeld if another job took the lease from this one (one GET)."""
        if self._lost is None:
            found = self.store.read_versioned(self.key)
            holder = _parse(found[0]) if found else None
            if holder is not None and holder.token == self.me.token:
                self._etag = found[1]  # type: ignore[index]
            elif found is None and self.store.put_if_absent(self.key, self._doc()):
                self._etag = self.store.read_versioned(self.key)[1]  # type: ignore[index]
            else:
                self._lose(holder)
        if self._lost:
            raise LeaseHeld(self._lost)

    def renew(self) -> None:
        try:
            self._etag = self.store.put_if_match(self.key, self._doc(), self._etag)
        except (PreconditionFailed, CheckpointNotFound):
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
            # Marked released by compare-and-swap, not deleted: a delete cannot be made
            # conditional, and one that ran late would remove the next holder's lease.
            with contextlib.suppress(PreconditionFailed, CheckpointNotFound):
                self.store.put_if_match(self.key, self._doc(released=True), self._etag)
        self._etag = None

    def __enter__(self) -> WriterLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _held(self, holder: Holder, renewed: bool) -> LeaseHeld:
        age = self._age()
        left = max(holder.ttl + _CLOCK_RESOLUTION - age, 0) + 1
        advice = (
            "it renewed its lease while this job waited: it is alive. Use another branch or "
            "stop that job"
            if renewed
            else f"Use another branch, stop that job, or wait {left:.0f}s for its lease to "
            "expire if it is gone"
        )
        return LeaseHeld(
            f"{self.store.url(self.key)}: branch {self.branch!r} is being written by "
            f"{holder.describe()} (renewed {age:.0f}s ago). {advice}."
        )

    def _known_alive(self, holder: Holder) -> bool:
        """A process of this machine that runs: no need to wait to know it is live."""
        return holder.same_machine(self.me) and _alive(holder.pid, holder.start)

    def _wait_out(self, holder: Holder, etag: str) -> None:
        """Watch the holder's lease until it expires by the store's clock or changes
        (renewed, or taken by another job); at most the holder's ttl."""
        left = holder.ttl + _CLOCK_RESOLUTION - self._age()
        log.warning(
            "%s: branch %r is leased by %s, not renewed for %.0fs; waiting up to %.0fs for "
            "the lease to expire before taking over (it raises LeaseHeld if the holder "
            "renews; wait=False / CheckpointManager(lease_wait=False) fails fast instead)",
            self.store.url(self.key),
            self.branch,
            holder.describe(),
            self._age(),
            left + 1,
        )
        deadline = time.monotonic() + max(left, 0) + 2 * _CLOCK_RESOLUTION
        step = min(1.0, holder.ttl / 10)
        while time.monotonic() < deadline:
            found = self.store.read_versioned(self.key)
            if found is None or found[1] != etag or self._age() > holder.ttl + _CLOCK_RESOLUTION:
                return
            time.sleep(step)

    def _free(self, holder: Holder | None) -> str | None:
        """Why the lease may be taken from ``holder``, or None while it is live: its own
        ttl passed by the store's clock since it was last written, or it is a process of
        this machine (same boot and pid namespace) that is gone -- or this very process
        (a second manager here takes over; the first can no longer save)."""
        if holder is None:
            return "unreadable"
        if holder.released:
            return "released"
        if self._age() > holder.ttl + _CLOCK_RESOLUTION:
            return f"expired: {holder.describe()}"
        if holder.same_machine(self.me):
            if holder.pid == self.me.pid and holder.start == self.me.start:
                return "from an earlier manager in this process"
            if not _alive(holder.pid, holder.start):
                return f"its process is gone: {holder.describe()}"
        return None

    def _age(self) -> float:
        """Seconds since the lease object was last written, by the store's clock."""
        return max(0.0, self.store.age(self.key) or 0.0)

    def _doc(self, released: bool = False) -> bytes:
        me = dataclasses.replace(self.me, released=released)
        return json.dumps({**asdict(me), "renewed": time.time(), "branch": self.branch}).encode()


def lease_fence(store: Store, branch: str) -> int:
    """The fencing token recorded in ``branch``'s lease object (0 if none)."""
    found = store.read_versioned(f"leases/{branch}.json")
    holder = _parse(found[0]) if found else None
    return holder.fence if holder is not None else 0


#: The longest ttl a stored lease may claim (a longer one is treated as unreadable):
#: a replacement job waits at most this long for a holder that stopped renewing.
MAX_TTL = 3600.0

_HOLDER = {
    "host": schema.text,
    "pid": lambda v: schema.integer(v, 1, 2**22),  # Linux's largest pid_max
    "started": schema.timestamp,
    "token": schema.text,
    "ttl": schema.number,
    "boot": schema.text,
    "pidns": schema.text,
    "start": schema.text,
    "fence": schema.count,
    "released": schema.flag,
}


def _parse(data: bytes) -> Holder | None:
    """The holder a lease object names; None if it is not a valid lease (it is then
    free to take, and the fencing token still protects the branch)."""
    try:
        found = schema.fields(schema.parse_json(data), _HOLDER)
        holder = Holder(**{"ttl": 60.0, **found})  # ttl: leases of older releases lack it
        if not 0 < holder.ttl <= MAX_TTL:
            raise schema.Invalid("ttl out of range")
        return holder
    except (schema.Invalid, TypeError):  # TypeError: a required field is missing
        return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot_id() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks after boot (field 22 of its stat)."""
    stat = _read(f"/proc/{pid}/stat")
    fields = stat[stat.rfind(")") + 2 :].split() if stat else []
    return fields[19] if len(fields) > 19 else ""


def _alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` of this pid namespace runs and is the one that started at
    ``start`` (not a later process given the same pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_ticks(pid)
    return not (start and now and now != start)
