"""Train the small GPT with DistributedDataParallel on several ranks, checkpointing to
any URI with cloudckpt. Same flags and log format as train_gpt.py; rank 0 writes the log.

    torchrun --nproc_per_node=2 examples/ddp_train.py --uri s3://bucket/runs/ddp --steps 200

Run it again with the same URI (any number of ranks) and it resumes where the last
checkpoint left off. SIGTERM to any one rank (a spot notice) makes every rank agree on a
final checkpoint at the same step and exit cleanly. ``--write spread`` has every rank
upload a share of each checkpoint; ``--read spread`` has each download a share and
broadcast it. The gloo backend runs on CPUs; on GPUs use nccl for training -- cloudckpt
keeps its own traffic on a gloo group either way.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from train_gpt import Windows, arguments, corpus, setup_logging

import cloudckpt
from cloudckpt.distributed import DistributedOptions
from cloudckpt.testing.gpt import GPT, GPTConfig


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__)
    p.add_argument("--write", choices=["rank0", "spread"], default="rank0")
    p.add_argument("--read", choices=["each", "rank0", "spread"], default="each")
    args = p.parse_args(argv)
    if not args.uri:
        p.error("give --uri or set CLOUDCKPT_URI")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    setup_logging(f"[rank {rank}] %(message)s", verbose=rank == 0)

    # The same seeds everywhere: replicated weights, dropout and RNG state on every rank.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, dropout=0.1)
    model = GPT(cfg)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    dataset = Windows(corpus(), cfg.block_size)
    sampler = cloudckpt.ResumableSampler(dataset, seed=args.seed, rank=rank, world_size=world)
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
        distributed=DistributedOptions(write=args.write, read=args.read),
    )
    start = mgr.restore(model=model, optimizer=opt, scheduler=sched, sampler=sampler)
    if rank == 0:
        print("fresh run" if start.fresh else f"resumed at step {start.step}", flush=True)

    log = open(args.log, "a") if args.log and rank == 0 else None  # noqa: SIM115 (closed below)
    step = start.step
    try:
        with mgr:
            while step < args.steps:
                for xy in loader:
                    ddp.train()
                    loss = ddp(xy[:, :-1], xy[:, 1:])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    # The logged loss is the mean over ranks, the same number on each.
                    mean = loss.detach().clone()
                    dist.all_reduce(mean)
                    mean = mean.item() / world
                    result = mgr.step(step + 1, metrics={"loss": mean})
                    if result.rolled_back is None and log:
                        log.write(json.dumps({"step": step + 1, "loss": mean}) + "\n")
                        log.flush()
                    step = result.step
                    if step >= args.steps or result.preempted:
                        break
                if mgr.preempted:
                    if rank == 0:
                        print(
                            f"preempted: final checkpoint at step {step} is committed", flush=True
                        )
                    break
            if not mgr.preempted and mgr.committed_step != step:
                mgr.save("final", sync=True)
    finally:
        if log:
            log.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
