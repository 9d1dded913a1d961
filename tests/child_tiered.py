"""A manager with a local tier in a job spanning "hosts", run by torchrun from
test_tiered_hosts.py: ``child_tiered.py BUCKET_URI BASE HOSTS STEPS OUT``.

Rank r is host ``HOSTS.split(",")[r]`` with its tier under ``BASE/<host>``. The run
restores, trains STEPS more steps (a local save each step, a bucket save every 4th) and
writes one JSON line per rank to ``OUT.<rank>``: the step it resumed from, the version it
loaded, whether that version is in the bucket, what recovering from peers received, and
a hash of the weights after the restore and at the end.
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from cloudckpt import CheckpointManager, LocalTier, Repo


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    uri, base, hosts, steps, out = sys.argv[1:6]
    per_rank = sys.argv[6:] == ["per-rank"]  # a tier directory per rank: per machine
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    host = hosts.split(",")[rank]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    where = f"{base}/{host}-{rank}" if per_rank else f"{base}/{host}"
    tier = LocalTier(where, every_steps=1, keep=2, host=host)
    mgr = CheckpointManager(uri, save_every_steps=4, local=tier, health=None, lease_ttl=10)
    try:
        start = mgr.restore(model=model, optimizer=opt)
    except ValueError as e:
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"rank": rank, "error": str(e)}, f)
        raise SystemExit(3) from None
    restored = digest(model)
    assert mgr.tiers is not None
    recover = mgr.tiers.last_recover
    # The replica of the host this one keeps, as restore() left it (re-created after the
    # load where this host was replaced).
    kept_of = mgr.tiers.hosts.replicated_by(host)
    kept = mgr.tiers.host.replica(kept_of) if kept_of else None
    replica_steps = sorted(v.step for v in kept.versions()) if kept else []
    g = torch.Generator().manual_seed(1000 + start.step)
    with mgr:
        for step in range(start.step + 1, start.step + 1 + int(steps)):
            x = torch.randn(16, 64, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.step(step, metrics={"loss": loss.item()})
    bucket_ids = {v.id for v in Repo(uri).versions()}
    record = {
        "rank": rank,
        "host": host,
        "resumed_step": start.step,
        "loaded": start.version.id if start.version else None,
        "loaded_in_bucket": start.version is not None and start.version.id in bucket_ids,
        "received": recover.bytes_received if recover else None,
        "recover_reason": recover.reason if recover else None,
        "replica_steps": replica_steps,
        "restored": restored,
        "final_step": mgr.step_count,
        "final": digest(model),
    }
    with open(f"{out}.{rank}", "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
