"""The settings every store call runs under: timeouts, retries, S3 transfer choices."""

from __future__ import annotations

from dataclasses import dataclass, field

from cloudckpt.store.retry import RetryPolicy

__all__ = ["StoreOptions"]


@dataclass(frozen=True)
class StoreOptions:
    """Timeouts and retries for every call the store makes.

    ``connect_timeout`` bounds opening a connection, ``read_timeout`` the wait for any
    byte of an answer (it restarts with every byte received, so a large transfer that
    keeps moving is never cut); ``retry.total_seconds`` bounds a whole call, retries
    included (see ``RetryPolicy``). The defaults (5 s, 20 s, 60 s) report an endpoint
    that accepts connections and never answers after about a minute, naming it in the
    ``StoreError``; raise them for a store that is known to pause longer (the previous
    defaults were 10 s, 60 s and 180 s).
    """

    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: S3 objects of at least two parts go up as multipart uploads, retried per part
    #: (blobs of the default 16 MiB chunks are single PUTs).
    part_size: int = 32 * 1024 * 1024
    #: On S3, move blob bytes (GET, PUT, HEAD) through obstore, which costs a fraction of
    #: the CPU of s3fs (see ``cloudckpt.store.s3_transport``); everything else uses s3fs.
    fast_path: bool = True
