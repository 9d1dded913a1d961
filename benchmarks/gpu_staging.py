"""GPU -> host staging time of a GPT-2-small training state, and cloudckpt from the GPU.

Run on a machine with a CUDA GPU (the test suite never needs one):

    python benchmarks/gpu_staging.py [OUT_DIR]

Builds GPT-2 small (124M parameters) with AdamW state after two real steps on the GPU
(~1.5 GB in fp32) and measures, median of several repetitions:

* the floor of a save that snapshots then uploads: the device -> host copy, into fresh
  pageable memory (``.cpu()``), into fresh pinned memory, and into reused pinned buffers
  (what an async save should do); and one host memcpy of the same bytes;
* ``torch.save`` of the GPU state into memory;
* ``cloudckpt.Repo.commit`` of the GPU state to a local directory (fresh repository each
  time, so every byte is compressed and written) and ``Repo.load(into=...)`` back into a
  model and optimizer on the GPU.

Writes RESULTS-gpu-staging.md (and .json) to OUT_DIR (default: benchmarks/).
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cloudckpt import CheckpointManager, HealthCheck, Repo
from cloudckpt.testing.gpt import GPT, GPTConfig
from cloudckpt.tree import tensors_by_path

REPEATS = 5


def timed(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_training_state() -> tuple[GPT, torch.optim.Optimizer, dict]:
    torch.manual_seed(0)
    cfg = GPTConfig.gpt2_small()
    model = GPT(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        idx = torch.randint(0, cfg.vocab_size, (2, 257), device="cuda")
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    return model, opt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2}


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    model, opt, state = gpu_training_state()
    tensors = list({id(t): t for t in tensors_by_path(state).values()}.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    gb = nbytes / 1e9

    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]

    def to_reused_pinned() -> None:
        for dst, src in zip(pinned, tensors, strict=True):
            dst.copy_(src, non_blocking=True)

    def to_fresh_pinned() -> None:
        for src in tensors:
            torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src, non_blocking=True)

    results: dict[str, float] = {
        "d2h pageable (.cpu())": timed(lambda: [t.cpu() for t in tensors]),
        "d2h fresh pinned": timed(to_fresh_pinned, repeats=3),
        "d2h reused pinned": timed(to_reused_pinned),
        "host memcpy (pinned -> fresh)": timed(lambda: [p.clone() for p in pinned]),
        "torch.save to memory": timed(lambda: torch.save(state, io.BytesIO()), repeats=3),
    }

    stored = 0

    def commit() -> None:
        nonlocal stored
        with tempfile.TemporaryDirectory() as tmp:
            stored = Repo(f"file://{tmp}/repo").commit(state, step=2).stored_bytes

    results["cloudckpt commit to local disk"] = timed(commit, repeats=3)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Repo(f"file://{tmp}/repo")
        repo.commit(state, step=2)
        results["cloudckpt load into GPU model+optimizer"] = timed(
            lambda: repo.load(into={"model": model, "optimizer": opt}), repeats=3
        )

    # The async save path from the GPU: snapshot into reused pinned buffers, upload behind.
    with tempfile.TemporaryDirectory() as tmp:
        mgr = CheckpointManager(
            f"file://{tmp}/async", async_save=True, health=HealthCheck(spike_factor=1e9)
        )
        mgr.restore(model=model, optimizer=opt)
        mgr.step(1)
        mgr.save("warm-up")
        mgr.wait()
        blocked, total = [], []
        for step in range(2, 2 + REPEATS):
            with torch.no_grad():  # a changed state, so every save uploads everything
                for p in model.parameters():
                    p.add_(1e-3)
            mgr.step(step)
            t0 = time.perf_counter()
            mgr.save("bench")
            blocked.append(time.perf_counter() - t0)
            mgr.wait()
            total.append(time.perf_counter() - t0)
        results["async save from GPU: training blocked"] = statistics.median(blocked)
        results["async save from GPU: until committed"] = statistics.median(total)
        saved = Repo(f"file://{tmp}/async").load(keys=["model"])["model"]
        live = model.state_dict()
        assert all(torch.equal(saved[k], live[k].cpu()) for k in live), "async save differs"
        mgr.close()

    name = torch.cuda.get_device_name()
    lines = [
        "# GPU -> host staging, GPT-2 small training state",
        "",
        f"Device: {name}; torch {torch.__version__}; {torch.get_num_threads()} CPU threads.",
        f"State: GPT-2 small (124M parameters) + AdamW after 2 steps, {len(tensors)} tensors, "
        f"{gb:.2f} GB fp32. Median of {REPEATS} (3 for the slow ones) after a warm-up.",
        "",
        "| operation | seconds | GB/s |",
        "|---|---|---|",
    ]
    for op, sec in results.items():
        lines.append(f"| {op} | {sec:.3f} | {gb / sec:.1f} |")
    lines += [
        "",
        f"cloudckpt stored {stored / 1e9:.2f} GB ({stored / nbytes:.3f} of raw).",
        "Command: `python benchmarks/gpu_staging.py` on the lent GPU machine.",
    ]
    text = "\n".join(lines) + "\n"
    (out_dir / "RESULTS-gpu-staging.md").write_text(text)
    (out_dir / "RESULTS-gpu-staging.json").write_text(
        json.dumps({"device": name, "bytes": nbytes, "seconds": results}, indent=1)
    )
    print(text)


if __name__ == "__main__":
    main()
