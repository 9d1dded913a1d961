"""Small JSON objects that stand where a framework expects a checkpoint file and name the
cloudckpt version holding it, so the framework's own listing, ``exists`` and "latest"
logic keep working on the bucket."""

from __future__ import annotations

import json
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import Any

from cloudckpt import CheckpointNotFound, CorruptCheckpoint, Repo, RepoOptions, Store

KIND = "cloudckpt-pointer"
#: A pointer is a few hundred bytes; anything longer is something else, never read whole.
_MAX_POINTER = 64 << 10
#: The version ids a repository writes (anything else is not a pointer of ours).
_VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Pointer:
    repo: str
    version: str

    def dumps(self) -> bytes:
        return json.dumps({"format": KIND, "repo": self.repo, "version": self.version}).encode()


def split(path: str) -> tuple[str, str]:
    """(directory URI, file name) of a checkpoint path."""
    path = str(path).rstrip("/")
    return posixpath.dirname(path), posixpath.basename(path)


def read(store: Store, name: str) -> Pointer:
    """The pointer at ``name``; CheckpointNotFound if absent, CorruptCheckpoint if the
    object there is something else (e.g. a pickled checkpoint, never unpickled here)."""
    try:
        data = store.get_buffer(name, limit=_MAX_POINTER)
    except CorruptCheckpoint:  # longer than any pointer: a pickled checkpoint, say
        data = b""
    try:
        doc = json.loads(bytes(data))
    except (ValueError, RecursionError):
        doc = None
    fields = doc if isinstance(doc, dict) and doc.get("format") == KIND else {}
    repo, version = fields.get("repo"), fields.get("version")
    if not (isinstance(repo, str) and isinstance(version, str) and _VERSION_ID.fullmatch(version)):
        raise CorruptCheckpoint(
            f"{store.url(name)} is not a cloudckpt checkpoint pointer (a torch.save file?). "
            "cloudckpt never unpickles; load such a file yourself if you trust it"
        )
    return Pointer(repo, version)


def find(store: Store, name: str) -> Pointer | None:
    """The pointer at ``name``, or None if nothing is there."""
    try:
        return read(store, name)
    except CheckpointNotFound:
        return None


class ClientCache:
    """Stores and repos by URI, each made once (each costs a new HTTP client)."""

    def __init__(self, storage_options: dict[str, Any] | None, options: RepoOptions | None):
        self.storage_options, self.options = storage_options, options
        self._stores: dict[str, Store] = {}
        self._repos: dict[str, Repo] = {}
        self._lock = threading.Lock()

    def store(self, uri: str) -> Store:
        with self._lock:
            if uri not in self._stores:
                self._stores[uri] = Store(uri, self.storage_options)
            return self._stores[uri]

    def repo(self, uri: str) -> Repo:
        with self._lock:
            if uri not in self._repos:
                self._repos[uri] = Repo(uri, self.storage_options, options=self.options)
            return self._repos[uri]

    def pointer(self, path: str) -> Pointer | None:
        directory, name = split(path)
        return find(self.store(directory), name)
