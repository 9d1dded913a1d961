"""Multi-rank scenarios, run by torchrun (gloo, CPU) from test_distributed.py.

Usage: torchrun --nproc_per_node=N child_dist.py SCENARIO URI
The endpoint and credentials come from the AWS environment. Each rank checks its own
results and exits non-zero on any failure; rank 0 prints one JSON line of findings.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from assertions import assert_state_equal, clone
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from cloudckpt import CheckpointManager, LeaseHeld, Repo, RepoOptions, StoreOptions, TransferOptions
from cloudckpt.dcp import CloudStorageReader, CloudStorageWriter
from cloudckpt.distributed import DistributedOptions, Group, commit, load
from cloudckpt.errors import CloudCkptError, StoreError
from cloudckpt.store import RetryPolicy
from cloudckpt.testing.faults import FaultPlan, FaultProxy
from cloudckpt.testing.gpt import GPT, GPTConfig

# Small chunks: many blobs, so every rank gets a share to upload.
OPTIONS = RepoOptions(transfer=TransferOptions(chunk_size=64 * 1024, pack_below=8 * 1024))


def ddp_trainer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, DistributedDataParallel]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_embd=64))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), DistributedDataParallel(model)


def train(model: nn.Module, ddp: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())  # each rank its data
    tokens = torch.randint(0, 256, (2, 33), generator=g)
    loss = ddp(tokens[:, :-1], tokens[:, 1:])
    opt.zero_grad()
    loss.backward()
    opt.step()


def replicated(uri: str) -> dict[str, Any]:
    group = Group.detect()
    repo = Repo(uri, options=OPTIONS)
    model, opt, ddp = ddp_trainer()
    found: dict[str, Any] = {"world": group.world}
    versions = {}
    for step, write in ((1, "rank0"), (2, "spread")):
        train(model, ddp, opt, step)
        state = clone({"model": model.state_dict(), "optimizer": opt.state_dict()})
        version = commit(repo, state, group, DistributedOptions(write=write), step=step)
        versions[write] = (version, state)
        found[write] = version.meta["ranks"]
    for write, (version, state) in versions.items():
        for read in ("each", "rank0", "spread"):
            fresh, fresh_opt, _ = ddp_trainer(seed=99)
            loaded = load(
                repo,
                version.id,
                group,
                DistributedOptions(read=read),
                into={"model": fresh, "optimizer": fresh_opt},
            )
            assert_state_equal(state["model"], fresh.state_dict(), f"{write}/{read} model")
            assert_state_equal(
                state["optimizer"], fresh_opt.state_dict(), f"{write}/{read} optimizer"
            )
            assert_state_equal(state["model"], loaded["model"], f"{write}/{read} returned")
    # The last rank's uploads fail for good: nobody may publish.
    before = [v.id for v in repo.versions()]
    failing = group.rank == group.world - 1
    with FaultProxy(
        os.environ["AWS_ENDPOINT_URL"],
        FaultPlan(rate=1.0 if failing else 0.0, kinds=("internal",), only=r"^PUT .*/blobs/"),
    ) as proxy:
        options = RepoOptions(
            transfer=OPTIONS.transfer,
            store=StoreOptions(retry=RetryPolicy(attempts=2, initial_backoff=0.01)),
        )
        broken = Repo(uri, proxy.storage_options({}), options=options)
        train(model, ddp, opt, 3)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        try:
            commit(broken, state, group, DistributedOptions(write="spread"), step=3)
            raise AssertionError("a failed rank must fail the commit")
        except StoreError as e:
            assert f"rank {group.world - 1}" in str(e) and "no version was published" in str(e)
            found["failure"] = str(e)[:200]
    group.barrier()
    assert [v.id for v in repo.versions()] == before
    return found


def fsdp_state(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 24))
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def full(state: dict[str, Any]) -> dict[str, Any]:
    """Every DTensor gathered to a whole tensor (the same on every rank)."""
    out = {}
    for k, v in state.items():
        if hasattr(v, "full_tensor"):
            out[k] = v.full_tensor()
        elif isinstance(v, dict):
            out[k] = full(v)
        else:
            out[k] = v
    return out


def dcp_save(uri: str) -> dict[str, Any]:
    model, opt = fsdp_state()
    torch.manual_seed(1)
    for _ in range(2):
        model(torch.randn(8, 48)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    writer = CloudStorageWriter(uri, step=2, options=OPTIONS)
    dcp.save({"model": msd, "optim": osd, "step": 2}, storage_writer=writer)
    expected = {"model": full(msd), "optim": {k: full(v) for k, v in osd["state"].items()}}
    # async_save: the same state again, as the next version
    again = CloudStorageWriter(uri, step=3, options=OPTIONS)
    future = dcp.async_save({"model": msd, "optim": osd, "step": 3}, storage_writer=again)
    future.result()
    if dist.get_rank() == 0:
        torch.save(expected, os.environ["EXPECTED"])  # the test's own file, read by rank 0
    return {"version": writer.version.id if writer.version else None}


def dcp_load(uri: str) -> dict[str, Any]:
    model, opt = fsdp_state(seed=7)
    model(torch.randn(2, 48)).sum().backward()
    opt.step()  # optimizer state exists, to be overwritten
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "step": 0}
    reader = CloudStorageReader(uri, options=OPTIONS)
    dcp.load(state, storage_reader=reader)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    expected = torch.load(os.environ["EXPECTED"], weights_only=True)
    assert_state_equal(expected["model"], full(state["model"]), "model")
    assert_state_equal(
        expected["optim"], {k: full(v) for k, v in state["optim"]["state"].items()}, "optim"
    )
    assert state["step"] == 3 and state["optim"]["param_groups"][0]["lr"] == 1e-3
    return {"loaded": reader.version.id if reader.version else None, "world": dist.get_world_size()}


def lease_held(uri: str) -> dict[str, Any]:
    """Another job holds the branch: every rank's restore raises LeaseHeld, at once (not
    rank 0 alone while the others wait in a collective)."""
    start = time.monotonic()
    mgr = CheckpointManager(uri, options=OPTIONS)
    try:
        mgr.restore(model=nn.Linear(4, 4))
    except LeaseHeld as e:
        assert "is being written by" in str(e), e
        return {"raised": "LeaseHeld", "seconds": time.monotonic() - start}
    raise AssertionError(f"rank {dist.get_rank()} restored although the lease is held")


def async_skew(uri: str) -> dict[str, Any]:
    """Async spread saves with ``when_busy="skip"`` while rank 0's save thread is slower
    (its retention takes longer): the ranks must agree on which saves to skip, or one
    commit pairs the shares of two steps; and on one version to roll back to."""
    model = nn.Linear(8, 8)
    mgr = CheckpointManager(
        uri,
        options=OPTIONS,
        save_every_steps=2,
        async_save=True,
        when_busy="skip",
        keep_last=2,
        distributed=DistributedOptions(write="spread"),
    )
    mgr.restore(model=model)
    if dist.get_rank() == 0:
        prune = mgr._prune
        mgr._prune = lambda: (time.sleep(0.6), prune())[1]  # type: ignore[method-assign]
    started = []
    with torch.no_grad():
        for step in range(1, 21):
            model.weight.fill_(step)
            model.bias.fill_(step)
            time.sleep(0.1)
            if mgr.step(step, metrics={"loss": 1.0}).saving:
                started.append(step)
        rolled = mgr.step(21, metrics={"loss": float("nan")}).rolled_back
    mgr.close()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(
        everyone,
        {
            "started": started,
            "weight": model.weight[0, 0].item(),
            "rolled": rolled.id if rolled else None,
        },
    )
    assert all(e == everyone[0] for e in everyone), everyone
    for v in mgr.repo.versions():  # each version holds its own step's state, whole
        w = mgr.repo.load(v.id)["model"]["weight"]
        assert torch.all(w == v.step), (v.step, w.flatten()[:4])
    return {"started": started, "versions": [v.step for v in mgr.repo.versions()]}


def main() -> None:
    scenario, uri = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        run = {
            "replicated": replicated,
            "dcp_save": dcp_save,
            "dcp_load": dcp_load,
            "lease_held": lease_held,
            "async_skew": async_skew,
        }[scenario]
        found = run(uri)
    except CloudCkptError as e:
        print(f"rank {dist.get_rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    if dist.get_rank() == 0:
        print(json.dumps(found), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
