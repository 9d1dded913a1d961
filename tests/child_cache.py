"""One of several processes sharing a blob cache directory (test_cache.py).

``child_cache.py URI CACHE_DIR SEED ROUNDS``: commits ``ROUNDS`` states of its own on the
branch ``p<SEED>`` through the shared cache (each shares ``frozen`` with every other
process, so they race on the same cache files), loads each back through the cache with
another Repo, and checks it bit-exact; prints ``ok <cache hits>`` at the end.
"""

from __future__ import annotations

import sys

import torch

from cloudckpt import Repo, RepoOptions, TransferOptions
from cloudckpt.blobs.cache import CacheOptions


def state(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + n)
    return {
        "frozen": torch.randn(64 * 1024, generator=torch.Generator().manual_seed(7)),
        "w": torch.randn(48 * 1024, generator=g),
        "b": torch.randn(100, generator=g),
    }


def options(cache_dir: str) -> RepoOptions:
    return RepoOptions(
        transfer=TransferOptions(chunk_size=64 * 1024, workers=4), cache=CacheOptions(cache_dir)
    )


def main() -> None:
    uri, cache_dir, seed, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    writer = Repo(uri, options=options(cache_dir))
    reader = Repo(uri, options=options(cache_dir))  # nothing shared with the writer in memory
    for n in range(rounds):
        want = state(seed, n)
        writer.commit(want, branch=f"p{seed}", step=n)
        got = reader.load(f"p{seed}")
        for name, tensor in want.items():
            if not torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)):
                raise SystemExit(f"round {n}: {name} differs")
    assert reader.cache is not None
    print(f"ok {reader.cache.hits}", flush=True)


if __name__ == "__main__":
    main()
