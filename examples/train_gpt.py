"""Train a small GPT on a generated corpus, checkpointing to any URI with cloudckpt.

    python examples/train_gpt.py --uri s3://bucket/runs/gpt --steps 200 --save-every 25

Run it again with the same URI and it resumes exactly where the last checkpoint left
off -- model, optimizer, LR schedule, RNG states and data position -- on this machine or
any other. The S3 endpoint and credentials come from the standard AWS environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

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


class Windows(Dataset):
    """Map-style dataset: window i is tokens [i*block, i*block + block + 1)."""

    def __init__(self, data: torch.Tensor, block: int) -> None:
        self.data, self.block = data, block

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i * self.block : i * self.block + self.block + 1]


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """The flags train_gpt.py and ddp_train.py share."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--uri", default=os.environ.get("CLOUDCKPT_URI"), help="checkpoint repository")
    p.add_argument("--steps", type=int, default=200, help="train until this global step")
    p.add_argument("--save-every", type=int, default=25, help="save every K steps")
    p.add_argument("--keep-last", type=int, default=3, help="versions to keep (plus milestones)")
    # --log-file too: torchrun takes --log for an abbreviation of its own --log-dir.
    p.add_argument(
        "--log",
        "--log-file",
        dest="log",
        help="append one JSON line per completed step to this file",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--async-save", action="store_true", help="upload in the background")
    p.add_argument(
        "--no-preemption-watcher",
        action="store_true",
        help="do not turn SIGTERM/SIGINT into a final checkpoint",
    )
    return p


def setup_logging(fmt: str = "%(message)s", verbose: bool = True) -> None:
    """cloudckpt's progress (INFO) on stderr; other libraries' warnings only. At INFO,
    botocore says "Found credentials in environment variables." for every session."""
    logging.basicConfig(level=logging.WARNING, format=fmt)
    logging.getLogger("cloudckpt").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__)
    args = p.parse_args(argv)
    if not args.uri:
        p.error("give --uri or set CLOUDCKPT_URI")
    setup_logging()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, dropout=0.1)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    dataset = Windows(corpus(), cfg.block_size)
    sampler = cloudckpt.ResumableSampler(dataset, seed=args.seed)
    # Its own generator: a DataLoader otherwise draws from the global RNG per epoch.
    loader = DataLoader(
        dataset, batch_size=args.batch, sampler=sampler, generator=torch.Generator()
    )

    mgr = cloudckpt.CheckpointManager(
        args.uri,
        save_every_steps=args.save_every,
        keep_last=args.keep_last,
        keep_every=10 * args.save_every,
        async_save=args.async_save,
        preemption=not args.no_preemption_watcher,
    )
    start = mgr.restore(model=model, optimizer=opt, scheduler=sched, sampler=sampler)
    print("fresh run" if start.fresh else f"resumed at step {start.step}", flush=True)

    log = open(args.log, "a") if args.log else None  # noqa: SIM115 (closed below)
    step = start.step
    try:
        with mgr:
            while step < args.steps:
                for xy in loader:
                    model.train()
                    loss = model(xy[:, :-1], xy[:, 1:])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    result = mgr.step(step + 1, metrics={"loss": loss.item()})
                    if result.rolled_back is None and log:
                        log.write(json.dumps({"step": step + 1, "loss": loss.item()}) + "\n")
                        log.flush()
                    step = result.step
                    if step >= args.steps or result.preempted:
                        break
                if mgr.preempted:
                    print(f"preempted: final checkpoint at step {step} is committed", flush=True)
                    break
            if not mgr.preempted and mgr.committed_step != step:
                mgr.save("final", sync=True)
    finally:
        if log:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
