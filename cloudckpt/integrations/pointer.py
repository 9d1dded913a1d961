"""Small JSON objects that stand where a framework expects a checkpoint file and name the
cloudckpt version holding it, so the framework's own listing, ``exists`` and "latest"
logic keep working on the bucket."""

from __future__ import annotations

import json
import posixpath
import threading
from dataclasses import dataclass
from typing import Any

from cloudckpt import schema
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint
from cloudckpt.repo import Repo, RepoOptions
from cloudckpt.store import Store

KIND = "cloudckpt-pointer"
#: A pointer is a few hundred bytes; anything longer is something else, never read whole.
_MAX_POINTER = 64 << 10


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
        doc = schema.parse_json(data)
        if not isinstance(doc, dict) or doc.get("format") != KIND:
            raise schema.Invalid("not a pointer")
        found = schema.fields(doc, {"repo": schema.text, "version": schema.vid})
        return Pointer(found["repo"], found["version"])
    except (schema.Invalid, KeyError):
        raise CorruptCheckpoint(
            f"{store.url(name)} is not a cloudckpt checkpoint pointer (a torch.save file?). "
            "cloudckpt never unpickles; load such a file yourself if you trust it"
        ) from None


def find(store: Store, name: str) -> Pointer | None:
    """The pointer at ``name``, or None if nothing is there."""
    try:
        return read(store, name)
    except CheckpointNotFound:
        return None


class Places:
    """Stores and repos by URI, made once: each costs a new HTTP client."""

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
