"""Retry policy for store calls: which failures are transient, and how long to keep trying."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import tenacity

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


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by total time.

    Only transient failures are retried (throttling, 5xx, resets, timeouts); a 403, a
    404 or a lost conditional write fails at once.
    """

    attempts: int = 8
    total_seconds: float = 180.0
    initial_backoff: float = 0.2
    max_backoff: float = 15.0

    def call(self, fn: Callable[[], T], describe: str) -> T:
        """Run ``fn`` under this policy; ``describe`` names the call in logs."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts)
            | tenacity.stop_after_delay(self.total_seconds),
            wait=tenacity.wait_random_exponential(
                multiplier=self.initial_backoff, max=self.max_backoff
            ),
            retry=tenacity.retry_if_exception(is_retryable),
            before_sleep=lambda rs: log.warning(
                "%s failed (attempt %d: %s); retrying",
                describe,
                rs.attempt_number,
                _short(rs.outcome.exception() if rs.outcome else None),
            ),
            reraise=True,
        )
        return retrying(fn)


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
    from cloudckpt.errors import CloudCkptError

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
