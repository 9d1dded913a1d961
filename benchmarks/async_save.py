"""How long an async save blocks training, against a synchronous save and one copy.

    python benchmarks/async_save.py [--preset small|gpt2]

Builds a GPT-2-small training state (124M parameters + AdamW after real steps, ~1.5 GB
fp32; ``--preset small`` for a quick run), starts a local SeaweedFS, and measures, median
of the repetitions, alternating the contenders:

* one in-memory copy of the state into fresh memory, and into existing buffers (the floor);
* ``CheckpointManager`` async save: the time ``save()`` blocks the training loop
  (snapshot into reused buffers), and the time until the commit lands;
* ``CheckpointManager`` sync save: the whole save.

Writes benchmarks/RESULTS-async-save.md. Target (issue 5): blocking <= 1.5x one copy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import uuid
from pathlib import Path

import torch

from cloudckpt import CheckpointManager, HealthCheck
from cloudckpt.testing.gpt import GPT, GPTConfig
from cloudckpt.testing.local_s3 import SeaweedFS
from cloudckpt.tree import tensors_by_path

OUT = Path(__file__).with_name("RESULTS-async-save.md")


def build(preset: str) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cfg = GPTConfig.gpt2_small() if preset == "gpt2" else GPTConfig(n_layer=4, n_embd=256)
    cfg = GPTConfig(**{**cfg.__dict__, "block_size": 64})  # short sequences: quick steps
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        idx = torch.randint(0, cfg.vocab_size, (1, 33))
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", choices=["small", "gpt2"], default="gpt2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model, opt = build(args.preset)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    tensors = list({id(t): t for t in tensors_by_path(state).values()}.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    buffers = [t.clone() for t in tensors]
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "copy into fresh memory",
            "copy into existing buffers",
            "async save: training blocked",
            "async save: until committed",
            "sync save",
        )
    }
    with SeaweedFS() as s3:
        bucket = s3.create_bucket()
        health = HealthCheck(spike_factor=1e9)
        amgr = CheckpointManager(
            f"s3://{bucket}/async-{uuid.uuid4().hex[:6]}",
            s3.storage_options(),
            async_save=True,
            health=health,
        )
        smgr = CheckpointManager(
            f"s3://{bucket}/sync-{uuid.uuid4().hex[:6]}", s3.storage_options(), health=health
        )
        for mgr in (amgr, smgr):
            mgr.restore(model=model, optimizer=opt)
        amgr.step(1)
        amgr.save("warm-up: allocates the snapshot buffers")
        amgr.wait()
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            _ = [t.clone() for t in tensors]
            rows["copy into fresh memory"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for b, t in zip(buffers, tensors, strict=True):
                b.copy_(t)
            rows["copy into existing buffers"].append(time.perf_counter() - t0)
            with torch.no_grad():  # a changed state, so every save uploads
                for p in model.parameters():
                    p.add_(1e-3)
            amgr.step(rep + 2)
            t0 = time.perf_counter()
            amgr.save("bench")
            rows["async save: training blocked"].append(time.perf_counter() - t0)
            amgr.wait()
            rows["async save: until committed"].append(time.perf_counter() - t0)
            smgr.step(rep + 2)
            t0 = time.perf_counter()
            smgr.save("bench")
            rows["sync save"].append(time.perf_counter() - t0)
        amgr.close()
        smgr.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    floor = med["copy into fresh memory"]
    lines = [
        "# Async save: how long training is blocked",
        "",
        f"State: GPT ({args.preset}) + AdamW after 2 steps, {len(tensors)} tensors, "
        f"{nbytes / 1e9:.2f} GB. Store: local SeaweedFS on 127.0.0.1 (sharing the CPUs).",
        f"Median of {args.repeats}, contenders alternated within each repetition.",
        "",
        "| operation | seconds | x one copy |",
        "|---|---|---|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.3f} | {v / floor:.2f} |")
    lines += [
        "",
        f"Blocking / one copy = **{med['async save: training blocked'] / floor:.2f}** "
        "(target <= 1.5); blocking / sync save = "
        f"**{med['async save: training blocked'] / med['sync save']:.3f}**.",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}. Command: `python benchmarks/async_save.py "
        f"--preset {args.preset}`.",
        "GPU staging (device -> pinned host) is measured in RESULTS-gpu-staging.md.",
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
