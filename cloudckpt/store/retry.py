"""Retry policy for store calls: which failures are transient, and how long to keep trying."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from cloudckpt.errors import CloudCkptError
from cloudckpt.redact import redact

log = logging.getLogger("cloudckpt.store")

T = TypeVar("T")

#: S3 error codes that mean "try again later".
_RETRYABLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "503",
    "500",
    "502",
    "504",
}
_RETRYABLE_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET}
#: How often a caller waiting on a watched attempt looks at its transfer's stop signal.
_POLL = 0.05


class Abandoned(CloudCkptError):
    """A call of a transfer that already failed (another blob failed for good) was given
    up before or between attempts; the transfer raises that first failure instead."""


_scope = threading.local()


@contextlib.contextmanager
def abandon_when(stop: threading.Event) -> Iterator[None]:
    """Within the block, this thread's store calls give up (``Abandoned``) once ``stop``
    is set: no new attempt starts, a backoff sleep ends at once, and a watched attempt
    in progress is left to finish on its own."""
    saved = getattr(_scope, "stop", None)
    _scope.stop = stop
    try:
        yield
    finally:
        _scope.stop = saved


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by total time.

    Only transient failures are retried (throttling, 5xx, resets, timeouts); a 403, a
    404 or a lost conditional write fails at once.

    ``total_seconds`` is a deadline for the whole call: no retry starts after it, a
    backoff never sleeps past it, and on S3 a retry still running at the deadline is
    abandoned (a first attempt is bounded by the connect and read timeouts of
    ``StoreOptions`` alone, so a transfer that keeps receiving bytes is never cut; keep
    ``total_seconds`` above ``connect_timeout + read_timeout``). With the defaults and
    the default ``StoreOptions`` (5 s to connect, 20 s without a byte), an endpoint that
    accepts connections and never answers is reported after about 60 s (three 20 s
    attempts); one that refuses connections after the eight attempts' backoff (about
    13 s on average, 26 s at most). A save or load stops at its first call that fails
    for good, so the same bounds hold for a whole transfer.
    """

    attempts: int = 8
    total_seconds: float = 60.0
    initial_backoff: float = 0.2
    max_backoff: float = 15.0

    def call(self, fn: Callable[[], T], describe: str, watch: bool = False) -> T:
        """Run ``fn`` under this policy; ``describe`` names the call in logs.

        With ``watch``, each attempt runs in a thread of its own, so that a retry still
        running at the deadline, or any attempt of a call whose transfer was abandoned
        (``abandon_when``), is left behind instead of waited for.
        """
        stop: threading.Event | None = getattr(_scope, "stop", None)
        deadline = time.monotonic() + self.total_seconds
        for attempt in range(1, self.attempts + 1):
            if stop is not None and stop.is_set():
                raise Abandoned(f"{describe}: abandoned (the transfer already failed)")
            try:
                if not watch:
                    return fn()
                limit = None if attempt == 1 else deadline - time.monotonic()
                return _watched(fn, limit, stop, describe, self.total_seconds)
            except Exception as e:
                left = deadline - time.monotonic()
                if isinstance(e, Abandoned) or not is_retryable(e) or attempt == self.attempts:
                    raise
                pause = random.uniform(
                    0, min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
                )
                if pause >= left:  # no time left for another attempt
                    raise
                # One warning per call; the later attempts of a store that stays down
                # are details (logged at INFO), the final error says the rest.
                level = logging.WARNING if attempt == 1 else logging.INFO
                log.log(level, "%s failed (attempt %d: %s); retrying", describe, attempt, _short(e))
                if stop is None:
                    time.sleep(pause)
                else:
                    stop.wait(pause)
        raise AssertionError("unreachable")  # pragma: no cover


def _watched(
    fn: Callable[[], T],
    limit: float | None,
    stop: threading.Event | None,
    describe: str,
    budget: float,
) -> T:
    """``fn()`` in a daemon thread; given up after ``limit`` seconds (TimeoutError) or
    once ``stop`` is set (Abandoned). An attempt given up runs on until its own
    timeouts end it; its outcome is dropped."""
    outcome: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # handed to the caller
            outcome.append((False, e))
        finally:
            done.set()

    threading.Thread(target=run, name="cloudckpt-call", daemon=True).start()
    end = None if limit is None else time.monotonic() + limit
    while True:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            break
        wait = left if stop is None else (_POLL if left is None else min(_POLL, left))
        if done.wait(wait):
            ok, value = outcome[0]
            if ok:
                return value  # type: ignore[no-any-return]
            raise value
        if stop is not None and stop.is_set():
            raise Abandoned(f"{describe}: abandoned (the transfer already failed)")
    raise TimeoutError(f"no answer within the call's {budget:g} s budget (RetryPolicy)")


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` says nothing listens at the endpoint (connection refused)."""
    return any(
        isinstance(e, ConnectionRefusedError)
        or "connection refused" in str(e).lower()
        or "connect call failed" in str(e).lower()
        for e in _chain(exc)
    )


def _short(exc: BaseException | None) -> str:
    return redact(f"{type(exc).__name__}: {exc}") if exc else "?"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def error_code(exc: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind ``exc``, if any."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            err = response.get("Error", {}) or {}
            meta = response.get("ResponseMetadata", {}) or {}
            return err.get("Code"), meta.get("HTTPStatusCode")
    return None, None


def is_retryable(exc: BaseException) -> bool:
    """True for failures that may succeed if the same call is made again."""
    if isinstance(exc, (CloudCkptError, FileNotFoundError, FileExistsError, PermissionError)):
        return False
    code, status = error_code(exc)
    if code is not None or status is not None:
        return code in _RETRYABLE_CODES or (status is not None and (status >= 500 or status == 429))
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if type(e).__module__.startswith(("aiohttp", "botocore", "urllib3")):
            name = type(e).__name__
            if any(w in name for w in ("Connection", "Timeout", "Payload", "Disconnect", "Read")):
                return True
        if isinstance(e, OSError) and e.errno in _RETRYABLE_ERRNOS:
            return True
    return False
