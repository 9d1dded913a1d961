"""``memory://``: the objects of this process, for tests and examples."""

from __future__ import annotations

from cloudckpt.store.fsspec_generic import FsspecBackend

__all__ = ["MemoryBackend"]


class MemoryBackend(FsspecBackend):
    """fsspec's in-memory file system. Only this process sees its objects, so the
    process-wide lock makes conditional writes exact: no warning, many writers."""
