"""Loading: blobs are fetched in parallel, decoded straight into the destination
arrays' memory, and every blob's hash is checked after decompression."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cloudckpt import codec
from cloudckpt.blobs.batch import CHARGE, Batch
from cloudckpt.blobs.cache import BlobCache
from cloudckpt.blobs.chunks import ChunkRef, blob_key, iter_chunks
from cloudckpt.blobs.options import TransferOptions, TransferStats
from cloudckpt.blobs.progress import Progress
from cloudckpt.errors import CheckpointNotFound, CorruptCheckpoint
from cloudckpt.store import Store

if TYPE_CHECKING:  # imported where bytes are moved, not at import
    import numpy as np


@dataclass
class _Fetch:
    """One blob to download, and the places its bytes go."""

    digest: str
    stored: int
    size: int
    parts: list[tuple[str, Any, ChunkRef]] = field(default_factory=list)


def _fetches(targets: list[tuple[dict[str, Any], Any]]) -> dict[str, _Fetch]:
    """Group chunk references by blob: each blob is fetched once, whoever uses it."""
    fetches: dict[str, _Fetch] = {}
    for entry, dest in targets:
        for ref in iter_chunks(entry):
            fetch = fetches.setdefault(ref.digest, _Fetch(ref.digest, ref.stored, ref.blob_size))
            if (fetch.stored, fetch.size) != (ref.stored, ref.blob_size):
                raise CorruptCheckpoint(f"manifest: blob {ref.digest} has conflicting sizes")
            fetch.parts.append((entry.get("path"), dest, ref))
    return fetches


#: The most HEADs ``check_sizes`` has in flight at once.
MAX_HEADS = 64


class BlobReader:
    """Downloads, decodes and verifies blobs into destination arrays; with a ``cache``,
    reads the blobs it holds from there and keeps those it downloads."""

    def __init__(
        self, store: Store, options: TransferOptions, cache: BlobCache | None = None
    ) -> None:
        self.store = store
        self.options = options
        self.cache = cache
        self.codec = codec.Codec(options.compression_level)

    def read(self, targets: list[tuple[dict[str, Any], Any]]) -> TransferStats:
        """Fill each ``(manifest entry, destination array)`` pair; returns the stats."""
        return self._transfer(_fetches(targets), "load", errors=None, cache=self.cache)

    def verify(self, entries: list[dict[str, Any]]) -> tuple[TransferStats, dict[str, str]]:
        """Download, decompress and hash every blob the entries use, keeping nothing;
        returns the stats and blob key -> what is wrong with it, for each bad blob. A
        store that fails (StoreError) stops it: that is raised."""
        errors: dict[str, str] = {}
        # The store's copies are what is verified: the cache is neither read nor filled.
        stats = self._transfer(_fetches([(e, None) for e in entries]), "verify", errors, None)
        return stats, errors

    def check_sizes(self, entries: list[dict[str, Any]]) -> None:
        """Check, before anything is allocated for them, that every blob the entries use
        exists and that its stored size fits the raw size the manifest gives it: not
        larger than any encoding of those bytes, nor too small to decode to them.

        One HEAD per distinct blob, in parallel on four times ``workers`` threads (at
        most :data:`MAX_HEADS`: a HEAD waits on the store's latency, not on this machine);
        the first blob that fails raises (``CorruptCheckpoint`` naming it, or the
        ``StoreError``).
        """
        fetches = _fetches([(e, None) for e in entries])
        threads = min(MAX_HEADS, 4 * self.options.workers, len(fetches)) or 1
        with Batch(threads, "cloudckpt-check") as batch:
            for digest, fetch in fetches.items():
                if not batch.submit(digest, 0, self._check_size, fetch):
                    break
            batch.results()

    def _check_size(self, fetch: _Fetch) -> None:
        if self.cache is not None and self.cache.has(fetch.digest, fetch.size):
            return  # read from the cache, checked by hash then; the store is the fallback
        key = blob_key(fetch.digest)
        where = f"{self.store.url(key)} (holding {fetch.parts[0][0]!r})"
        info = self.store.stat(key)
        if info is None:
            raise CorruptCheckpoint(f"{where} is missing from the store")
        if info.size > codec.max_stored(fetch.size):
            raise CorruptCheckpoint(
                f"{where}: {info.size} bytes stored, more than any encoding of the "
                f"{fetch.size} bytes the manifest gives it"
            )
        if fetch.size > codec.max_raw(info.size):
            raise CorruptCheckpoint(
                f"{where}: {info.size} bytes stored cannot decode to the {fetch.size} "
                f"bytes the manifest gives it (at most {codec.max_raw(info.size)})"
            )

    def _transfer(
        self,
        fetches: dict[str, _Fetch],
        desc: str,
        errors: dict[str, str] | None,
        cache: BlobCache | None,
    ) -> TransferStats:
        t0 = time.perf_counter()
        stats = TransferStats(
            logical_bytes=sum(r.size for f in fetches.values() for _, _, r in f.parts)
        )
        progress = Progress(self.options.progress, stats.logical_bytes, desc)
        # verify reports every corrupt blob and goes on; anything else stops the batch.
        tolerate = (lambda e: isinstance(e, CorruptCheckpoint)) if errors is not None else None
        try:
            with Batch(
                self.options.workers,
                f"cloudckpt-{desc}",
                self.options.max_inflight_bytes,
                tolerate or (lambda e: False),
            ) as batch:
                for digest, fetch in fetches.items():
                    args = (fetch, batch, progress, cache)
                    if not batch.submit(digest, CHARGE * fetch.size, self._load_blob, *args):
                        break
                done = batch.results()
            for digest, outcome in done.items():
                if outcome is None:  # read from the cache: nothing came from the store
                    stats.reused_blobs += 1
                    continue
                if isinstance(outcome, BaseException):
                    assert errors is not None
                    errors[blob_key(digest)] = str(outcome)
                else:
                    stats.transferred_bytes += outcome
                stats.transferred_blobs += 1
        finally:
            progress.close()
        stats.stored_bytes = stats.transferred_bytes
        stats.seconds = time.perf_counter() - t0
        return stats

    def _load_blob(
        self, fetch: _Fetch, batch: Batch, progress: Progress, cache: BlobCache | None
    ) -> int | None:
        """Fill the blob's destinations; the bytes fetched from the store, or None when
        the cache held it."""
        try:
            _, dest, ref = fetch.parts[0]
            direct = len(fetch.parts) == 1 and ref.size == fetch.size and dest is not None
            if cache is not None and cache.has(fetch.digest, fetch.size):
                with batch.gate.inside():  # the destination is the caller's
                    raw = self._raw(fetch, direct)
                    if cache.read_into(fetch.digest, raw):
                        self._scatter(fetch, raw, direct)
                        return None
            if self.store.in_place:
                with batch.gate.inside():  # the destination is the caller's
                    raw = self._raw(fetch, direct)
                    if self._read_in_place(fetch, raw):
                        self._check(fetch, raw)
                        self._scatter(fetch, raw, direct)
                        return codec.RAW_HEADER + fetch.size
            blob = self._get(fetch)
            with batch.gate.inside():  # the destination is the caller's: not after a failure
                raw = self._raw(fetch, direct)
                self._decode(fetch, blob, raw, check=True)
                self._scatter(fetch, raw, direct)
                if cache is not None:
                    cache.put(fetch.digest, raw)
            return len(blob)
        finally:
            progress.update(fetch.size)

    def raw(self, digest: str, size: int, *, check: bool = True) -> np.ndarray:
        """The raw bytes of one blob (from the cache, else the store), checked against
        its hash -- unless ``check`` is False: then the caller checks them (``copy_version``
        does, for every source). A cache hit is checked either way."""
        fetch = _Fetch(digest, 0, size)
        raw = self._raw(fetch, direct=False)
        if self.cache is not None and self.cache.read_into(digest, raw):
            return raw
        if self.store.in_place and self._read_in_place(fetch, raw):
            if check:
                self._check(fetch, raw)
        else:
            self._decode(fetch, self._get(fetch), raw, check)
        return raw

    def _read_in_place(self, fetch: _Fetch, raw: np.ndarray) -> bool:
        """Read the blob straight into ``raw`` if it is stored uncompressed on this
        machine's disk (a local tier): one open gives its size, header and payload.
        False if it is not (compressed, missing, changed meanwhile): read it whole and
        decode it then. The hash is the caller's to check."""
        header = memoryview(bytearray(codec.RAW_HEADER))
        try:
            filled = self.store.read_into(blob_key(fetch.digest), [header, memoryview(raw)])
        except CheckpointNotFound:  # reading it whole says what is missing
            return False
        return filled and codec.raw_payload(header, fetch.size)

    def _where(self, fetch: _Fetch) -> str:
        holding = f" (holding {fetch.parts[0][0]!r})" if fetch.parts else ""
        return f"{self.store.url(blob_key(fetch.digest))}{holding}"

    def _get(self, fetch: _Fetch) -> bytes | memoryview:
        # Any encoding of the blob's bytes will do (writers with another dtype's codec
        # or level may have stored it); decoding and the hash check the rest. Nothing
        # past the longest such encoding is ever read.
        limit = codec.max_stored(fetch.size)
        try:
            return self.store.get_buffer(blob_key(fetch.digest), limit)
        except CheckpointNotFound:
            raise CorruptCheckpoint(f"{self._where(fetch)} is missing from the store") from None
        except CorruptCheckpoint:
            raise CorruptCheckpoint(
                f"{self._where(fetch)}: more than {limit} bytes stored, more than any "
                f"encoding of its {fetch.size} bytes"
            ) from None

    @staticmethod
    def _raw(fetch: _Fetch, direct: bool) -> np.ndarray:
        """Where the blob's raw bytes go: the destination itself when it is the only
        user and on the CPU, else a scratch array."""
        import numpy as np

        if direct:
            _, dest, ref = fetch.parts[0]
            raw = _dest_bytes(dest, ref.offset, ref.size)
            if raw is not None:
                return raw
        return np.empty(fetch.size, dtype=np.uint8)

    def _decode(
        self, fetch: _Fetch, blob: bytes | memoryview, raw: np.ndarray, check: bool
    ) -> None:
        """Decode into ``raw``; with ``check``, against the blob's hash (in one pass where
        the codec can)."""
        digest = fetch.digest if check else None
        self.codec.decode_into(blob, raw, self._where(fetch), digest)

    def _check(self, fetch: _Fetch, raw: np.ndarray) -> None:
        if codec.content_hash(raw) != fetch.digest:
            raise CorruptCheckpoint(f"{self._where(fetch)}: content does not match its hash")

    @staticmethod
    def _scatter(fetch: _Fetch, raw: np.ndarray, direct: bool) -> None:
        for _, dest, ref in fetch.parts:
            if dest is not None and not (direct and _is_cpu(dest)):
                _copy_into(dest, ref.offset, raw[ref.blob_offset : ref.blob_offset + ref.size])


def _is_cpu(dest: Any) -> bool:
    import numpy as np

    return isinstance(dest, np.ndarray) or dest.device.type == "cpu"


def _copy_into(dest: Any, offset: int, data: np.ndarray) -> None:
    if _is_cpu(dest):
        _dest_bytes(dest, offset, data.size)[:] = data
    else:
        import torch

        flat = dest.reshape(-1).view(torch.uint8)
        flat[offset : offset + data.size].copy_(torch.from_numpy(data))


def _dest_bytes(dest: Any, offset: int, size: int) -> np.ndarray | None:
    """Writable CPU bytes ``[offset, offset + size)`` of ``dest``; None if it is not on
    the CPU."""
    import numpy as np
    import torch

    if isinstance(dest, np.ndarray):
        return dest.reshape(-1).view(np.uint8)[offset : offset + size]
    if dest.device.type != "cpu":
        return None
    return dest.reshape(-1).view(torch.uint8).numpy()[offset : offset + size]
