"""Per-function timings of three hot paths of the tiers, on a GPT's real state.

    PYTHONPATH=. python benchmarks/hot_paths.py [--preset mid] [--repeats 7] [--dir /dev/shm]

- ``tier upload``: ``copy_version`` of a local (uncompressed) version into a fresh
  repository, from the tier's source, and how often each blob is hashed doing it;
- ``in-place load``: ``Repo.load(into=...)`` of an uncompressed ``file://`` version, and
  the opens and stats of blob files per blob;
- ``save + cache``: ``Repo.commit`` of the state into a fresh ``memory://`` repository,
  without a blob cache and with a cold one (under ``--dir``), and whether the cache then
  holds every blob.

Each is run with the default 16 MiB chunks and with 256 KiB ones (per-blob costs show;
``--chunks``).
Times are ``wall s/CPU s`` (the CPU seconds of every thread), each the least of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cloudckpt import CacheOptions, Repo, RepoOptions, TransferOptions, codec
from cloudckpt.testing import gpt
from cloudckpt.tiers.copy import blobs_of as copy_blobs_of
from cloudckpt.tiers.copy import copy_version
from cloudckpt.tiers.local import HostTier, LocalTier

KiB, MiB = 1 << 10, 1 << 20


class Counts:
    """The digests hashed, and blob files opened and stat'ed, while it is entered."""

    def __init__(self) -> None:
        self.hashed: list[str] = []
        self.opens = 0
        self.stats = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[Counts]:
        hash_, open_, stat_ = codec.content_hash, os.open, os.stat

        def content_hash(raw: Any) -> str:
            self.hashed.append(hash_(raw))
            return self.hashed[-1]

        def blob(path: Any) -> bool:
            return isinstance(path, str) and "/blobs/" in path

        def opened(path: Any, *args: Any, **kw: Any) -> int:
            self.opens += blob(path)
            return open_(path, *args, **kw)

        def stat(path: Any, *args: Any, **kw: Any) -> os.stat_result:
            self.stats += blob(path)
            return stat_(path, *args, **kw)

        codec.content_hash, os.open, os.stat = content_hash, opened, stat  # type: ignore[assignment]
        try:
            yield self
        finally:
            codec.content_hash, os.open, os.stat = hash_, open_, stat_  # type: ignore[assignment]


def best_of(repeats: int, run: Callable[[], tuple[float, float]]) -> str:
    """``wall s/CPU s`` (every thread of the process), each the least of the runs: on a
    shared machine the least is the closest to the work's own cost."""
    runs = [run() for _ in range(repeats)]
    return f"{min(r[0] for r in runs):.3f}/{min(r[1] for r in runs):.3f}"


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def blobs_of(repo: Repo) -> int:
    return len(repo.store.list_keys("blobs/"))


def tier_upload(state: Any, tier: HostTier, chunk: int, repeats: int, where: str) -> dict[str, Any]:
    """copy_version from the tier into a fresh repository (compressed, as a bucket)."""
    from cloudckpt.tiers.local import TierRecord

    version = tier.commit(state, 1, {}, {}, TierRecord("bench", None))
    doc = tier.manifest(version)

    def once(options: TransferOptions) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            dst = Repo(f"memory://hot/{uuid.uuid4().hex}", options=RepoOptions(transfer=options))
            return timed(lambda: copy_version(tier.source(), doc, dst, "main"))

        return run

    def read() -> tuple[float, float]:
        """What the copy does with each blob before encoding it: read it, check it."""
        source = tier.source()

        def every() -> None:
            for digest, blob in blobs.items():
                if codec.content_hash(source(digest, blob.size)) != digest:
                    raise AssertionError(digest)

        return timed(every)

    blobs = copy_blobs_of(doc)
    counts = Counts()
    with counts.counting():
        once(TransferOptions(chunk_size=chunk))()
    raw = TransferOptions(chunk_size=chunk, compress=False)

    def cached() -> tuple[float, float]:
        cache = tempfile.mkdtemp(dir=where)
        options = RepoOptions(transfer=TransferOptions(chunk_size=chunk), cache=CacheOptions(cache))
        dst = Repo(f"memory://hot/{uuid.uuid4().hex}", options=options)
        try:
            return timed(lambda: copy_version(tier.source(), doc, dst, "main"))
        finally:
            assert dst.cache is not None
            dst.cache.flush()
            shutil.rmtree(cache, ignore_errors=True)

    return {
        "blobs": blobs_of(tier.repo),
        "hashes / blob": sum(d in blobs for d in counts.hashed) / len(blobs),
        "s read+check": best_of(repeats, read),
        "s (bucket codec, cold cache)": best_of(repeats, cached),
        "s (bucket codec)": best_of(repeats, once(TransferOptions(chunk_size=chunk))),
        "s (uncompressed)": best_of(repeats, once(raw)),
    }


def in_place_load(state: Any, model: Any, opt: Any, root: str, chunk: int, repeats: int) -> dict:
    """Repo.load(into=...) of an uncompressed file:// version, into the live objects."""
    options = RepoOptions(transfer=TransferOptions(chunk_size=chunk, compress=False))
    repo = Repo(f"file://{root}", options=options)
    repo.commit(state)
    into = {"model": model, "optimizer": opt}
    counts = Counts()
    with counts.counting():
        Repo(f"file://{root}", options=options).load(into=into)
    n = blobs_of(repo)

    def run() -> tuple[float, float]:
        return timed(lambda: Repo(repo.uri, options=options).load(into=into))

    return {
        "blobs": n,
        "opens / blob": counts.opens / n,
        "stats / blob": counts.stats / n,
        "s": best_of(repeats, run),
    }


def throttled(repo: Repo, per_second: float) -> None:
    """Each blob PUT of ``repo`` takes its bytes / ``per_second`` seconds more, idle (as a
    request on the network: the CPU is free meanwhile)."""
    put = repo.store.backend.put

    def slow(key: str, data: Any, call: Any) -> None:
        if key.startswith("blobs/"):
            time.sleep(memoryview(data).nbytes / per_second)
        put(key, data, call)

    repo.store.backend.put = slow  # type: ignore[method-assign]


def save_with_cache(state: Any, where: str, chunk: int, repeats: int) -> dict[str, Any]:
    """Repo.commit into a fresh memory:// repository (as fast as memory, or each blob
    request at 200 MB/s): no cache, then a cold cache; whether the cache then holds every
    blob, once its background writes are done."""
    complete: list[bool] = []

    def once(compress: bool, cached: bool, per_second: float) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            cache = tempfile.mkdtemp(dir=where) if cached else None
            options = RepoOptions(
                transfer=TransferOptions(chunk_size=chunk, compress=compress),
                cache=CacheOptions(cache) if cache else None,
            )
            repo = Repo(f"memory://hot/{uuid.uuid4().hex}", options=options)
            if per_second:
                throttled(repo, per_second)
            try:
                took = timed(lambda: repo.commit(state))
                if repo.cache is not None:
                    repo.cache.flush()
                    held = {p.name for p in Path(repo.cache.root).glob("??/*")}
                    blobs = {k.rsplit("/", 1)[1] for k in repo.store.list_keys("blobs/")}
                    complete.append(held == blobs)
                return took
            finally:
                if repo.cache is not None:
                    shutil.rmtree(repo.cache.root, ignore_errors=True)

        return run

    out: dict[str, Any] = {}
    for compress, per_second in ((True, 0.0), (False, 0.0), (True, 200e6)):
        label = ("compressed" if compress else "uncompressed") + (
            ", 200 MB/s requests" if per_second else ""
        )
        out[f"s no cache ({label})"] = best_of(repeats, once(compress, False, per_second))
        out[f"s cold cache ({label})"] = best_of(repeats, once(compress, True, per_second))
    out["cache holds every blob"] = all(complete)
    return out


def build(preset: str) -> tuple[Any, Any]:
    """A GPT of ``preset`` and its AdamW after one step; ``mid`` (6 layers of 640: 354 MB
    of tensors with AdamW's) sits between ``small`` and ``gpt2``."""
    if preset != "mid":
        return gpt.benchmark_model(preset)
    import torch

    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=6, n_head=8, n_embd=640))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, 256, (2, 33))
    model(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mid")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--only", choices=["upload", "load", "cache"], action="append")
    p.add_argument("--chunks", default="16384,256", help="chunk sizes in KiB")
    args = p.parse_args()
    model, opt = build(args.preset)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    logical = sum(t.nbytes for t in model.state_dict().values()) * 3
    print(f"preset {args.preset}: about {logical / MiB:.0f} MiB of tensors, {os.cpu_count()} CPUs")
    only = set(args.only or ["upload", "load", "cache"])
    for chunk in (int(kib) * KiB for kib in args.chunks.split(",")):
        work = tempfile.mkdtemp(dir=args.dir)
        try:
            rows: dict[str, dict[str, Any]] = {}
            if "upload" in only:
                local = LocalTier(
                    os.path.join(work, "tier"),
                    transfer=TransferOptions(chunk_size=chunk, compress=False),
                )
                tier = HostTier(local, "memory://x", "main")
                rows["tier upload"] = tier_upload(state, tier, chunk, args.repeats, work)
            if "load" in only:
                rows["in-place load"] = in_place_load(
                    state, model, opt, os.path.join(work, "repo"), chunk, args.repeats
                )
            if "cache" in only:
                rows["save + cache"] = save_with_cache(state, work, chunk, args.repeats)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"\nchunk_size {chunk // KiB} KiB")
        for name, row in rows.items():
            for k, v in row.items():
                print(
                    f"| {name} | {k} | {v:.3f} |"
                    if isinstance(v, float)
                    else f"| {name} | {k} | {v} |"
                )


if __name__ == "__main__":
    main()
