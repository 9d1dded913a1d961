"""Train a small GPT on a generated corpus, checkpointing to any URI with cloudckpt.

    python examples/train_gpt.py --uri s3://bucket/runs/gpt --steps 200 --save-every 25

Run it again with the same URI and it resumes from the last committed version, on this
machine or any other (the S3 endpoint and credentials come from the standard AWS
environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import numpy as np
import torch

import cloudckpt
from cloudckpt.testing.gpt import GPT, GPTConfig

WORDS = [
    "the",
    "a",
    "model",
    "checkpoint",
    "spot",
    "instance",
    "resumes",
    "training",
    "from",
    "object",
    "storage",
    "while",
    "gradients",
    "flow",
    "through",
    "layers",
    "of",
    "attention",
    "and",
    "every",
    "step",
    "moves",
    "weights",
    "toward",
    "lower",
    "loss",
    "on",
    "text",
]


def corpus(n_chars: int = 200_000, seed: int = 1234) -> torch.Tensor:
    """A deterministic pseudo-English byte corpus."""
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ". "
        out.append(sentence.capitalize())
        size += len(sentence)
    return torch.tensor(list("".join(out).encode()[:n_chars]), dtype=torch.long)


def batch_at(data: torch.Tensor, step: int, batch: int, block: int, seed: int) -> torch.Tensor:
    """The batch for a global step: a function of the step alone, so resuming at step k
    continues the same data order without saving any sampler state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - block - 1, (batch,), generator=g)
    return torch.stack([data[s : s + block + 1] for s in starts.tolist()])


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--uri", default=os.environ.get("CLOUDCKPT_URI"), help="checkpoint repository")
    p.add_argument("--steps", type=int, default=200, help="train until this global step")
    p.add_argument("--save-every", type=int, default=25, help="commit every K steps")
    p.add_argument("--log", help="append one JSON line per completed step to this file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    if not args.uri:
        p.error("give --uri or set CLOUDCKPT_URI")

    torch.manual_seed(args.seed)
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = corpus()
    repo = cloudckpt.Repo(args.uri)

    step = 0
    try:
        saved = repo.load("main", into={"model": model, "optimizer": opt})
    except cloudckpt.CheckpointNotFound:
        print(f"fresh run: no checkpoint at {args.uri}", flush=True)
    else:
        step = saved["step"]
        set_rng_state(saved["rng"])
        print(f"resumed from step {step} ({repo.resolve('main').id})", flush=True)

    log = open(args.log, "a") if args.log else None  # noqa: SIM115 (closed below)
    try:
        while step < args.steps:
            xy = batch_at(data, step, args.batch, cfg.block_size, args.seed)
            loss = model(xy[:, :-1], xy[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if log:
                log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                log.flush()
            if step % args.save_every == 0 or step == args.steps:
                t0 = time.perf_counter()
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "step": step, "rng": rng_state()}  # fmt: skip
                v = repo.commit(state, step=step, metrics={"loss": loss.item()})
                print(
                    f"step {step:5d}  loss {loss.item():.4f}  saved {v.id}: "
                    f"{v.uploaded_bytes / 1e3:.0f} kB uploaded of {v.logical_bytes / 1e3:.0f} kB "
                    f"in {time.perf_counter() - t0:.2f}s",
                    flush=True,
                )
    finally:
        if log:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
