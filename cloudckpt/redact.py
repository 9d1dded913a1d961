"""Keeping credentials out of what cloudckpt says: log lines, exception messages, CLI output.

Scrubbed: every credential value a store was given (``storage_options`` key, secret,
token...) or found in the standard environment variables, the signature and credential
parameters of presigned URLs, ``user:password@`` in URLs, and Authorization headers.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
#: storage_options entries (at any depth) whose values are credentials.
SECRET_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "credentials",
    }
)
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)
_URL_PARAMS = re.compile(
    r"(?i)\b((?:X-Amz-(?:Signature|Credential|Security-Token)|X-Goog-(?:Signature|Credential)"
    r"|Signature|AWSAccessKeyId|GoogleAccessId|sig|skoid|sktid)=)[^&\s\"'<>]+"
)
# Everything between "://" and "@": a password may hold "/", and botocore elides the
# middle of long URLs ("http://...secret@host").
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s@'\"`<>]*@")
_AUTH_HEADER = re.compile(r"(?i)\b(authorization['\"]?\s*[:=]\s*['\"]?)[^'\"\n]+")

_known: set[str] = set()
_lock = threading.Lock()


def remember(storage_options: Mapping[str, Any] | None) -> None:
    """Add the credential values in ``storage_options`` to those always scrubbed."""
    found = set(_secret_values(storage_options or {}))
    with _lock:
        _known.update(v for v in found if len(v) >= 4)


def _secret_values(opts: Any) -> Iterable[str]:
    if isinstance(opts, Mapping):
        for name, value in opts.items():
            if str(name).lower() in SECRET_OPTIONS and isinstance(value, str):
                yield value
            else:
                yield from _secret_values(value)


def redact(text: str) -> str:
    """``text`` with every credential this process knows of replaced by ``***``."""
    values = {os.environ.get(name, "") for name in SECRET_ENV} | _known
    for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        text = text.replace(value, MASK)
    text = _URL_PARAMS.sub(rf"\1{MASK}", text)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    return _AUTH_HEADER.sub(rf"\1{MASK}", text)
