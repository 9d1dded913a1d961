"""A torchrun worker for the DCP conformance suite: the same cases through cloudckpt's
storage writer/reader or torch's FileSystemWriter/Reader (argv: backend, root, phase)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

from cloudckpt.dcp import CloudStorageReader, CloudStorageWriter


def writer(backend: str, root: str, name: str) -> Any:
    if backend == "cloudckpt":
        return CloudStorageWriter(f"file://{root}/{name}")
    return dcp.FileSystemWriter(f"{root}/{name}")


def reader(backend: str, root: str, name: str) -> Any:
    if backend == "cloudckpt":
        return CloudStorageReader(f"file://{root}/{name}")
    return dcp.FileSystemReader(f"{root}/{name}")


def matrix() -> torch.Tensor:
    return torch.arange(32, dtype=torch.float32).reshape(8, 4)


def fsdp(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small FSDP2 model (fully_shard on CPU, gloo) and its AdamW, one step trained."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 12)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def gathered(state: dict[str, Any]) -> dict[str, Any]:
    """Every DTensor of a state as a whole tensor (the same on every rank)."""
    return {
        k: gathered(v) if isinstance(v, dict) else v.full_tensor() if isinstance(v, DTensor) else v
        for k, v in state.items()
    }


def save(backend: str, root: str) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded = distribute_tensor(matrix(), mesh, [Shard(0)])
    replicated = distribute_tensor(matrix() * 2, mesh, [Replicate()])
    state = {"m": sharded, "r": replicated, "n": 7}
    dcp.save(state, storage_writer=writer(backend, root, "shard"))
    # Plan caching: the second save's plans are DCP's cached ones; its data is new.
    for value in (1.0, 2.0):
        cached = {"m": distribute_tensor(matrix() + value, mesh, [Shard(0)]), "n": value}
        planner = DefaultSavePlanner(enable_plan_caching=True)
        dcp.save(cached, storage_writer=writer(backend, root, "caching"), planner=planner)
    # Replicated tensors written once, by the lowest rank holding them.
    dedup = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
    dcp.save({"r": replicated}, storage_writer=writer(backend, root, "dedup"), planner=dedup)
    # async_save in a background process (DCP's process stager).
    if backend == "cloudckpt":  # every rank would publish its own shards as a version
        try:
            dcp.save(state, storage_writer=writer(backend, root, "alone"), use_collectives=False)
        except Exception as e:  # DCP wraps what a rank raised
            assert "use_collectives=False" in repr(e) or "use_collectives=False" in str(
                getattr(e, "failures", "")
            ), e
        else:
            raise AssertionError("a save without collectives was published")
    model, opt = fsdp(seed=1)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=writer(backend, root, "fsdp"))
    expected = gathered({"model": msd, "optim": osd["state"]})
    if dist.get_rank() == 0:
        torch.save(expected, f"{root}/fsdp-expected.pt")
    response = dcp.async_save(
        {"m": sharded, "n": 9},
        storage_writer=writer(backend, root, "async"),
        async_checkpointer_type=AsyncCheckpointerType.PROCESS,
    )
    (response.upload_completion if hasattr(response, "upload_completion") else response).result()
    return {"saved": True}


def reshard(backend: str, root: str) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    # Saved as Shard(0) on 2 ranks, loaded as Replicate.
    into = {"m": distribute_tensor(torch.zeros(8, 4), mesh, [Replicate()]), "n": 0}
    dcp.load(into, storage_reader=reader(backend, root, "shard"))
    assert torch.equal(into["m"].full_tensor(), matrix()) and into["n"] == 7, into
    # Saved by one process as a plain tensor, loaded as Shard(0) on 2 ranks.
    single: dict[str, Any] = {"m": distribute_tensor(torch.zeros(8, 4), mesh, [Shard(0)])}
    dcp.load(single, storage_reader=reader(backend, root, "single"))
    local = single["m"].to_local() if isinstance(single["m"], DTensor) else single["m"]
    rows = 8 // dist.get_world_size()
    want = (matrix() * 3)[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]
    assert torch.equal(local, want), (local, want)
    # FSDP2: a fresh model and optimizer (other weights, a step's state) load the save.
    model, opt = fsdp(seed=7)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=reader(backend, root, "fsdp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    msd, osd = get_state_dict(model, opt)
    got = gathered({"model": msd, "optim": osd["state"]})
    expected = torch.load(f"{root}/fsdp-expected.pt", weights_only=True)  # the test's own
    for part in ("model", "optim"):
        flat_got, flat_want = _flat(got[part]), _flat(expected[part])
        assert flat_got.keys() == flat_want.keys(), (part, flat_got.keys(), flat_want.keys())
        for k, want in flat_want.items():
            assert (
                torch.equal(flat_got[k], want)
                if isinstance(want, torch.Tensor)
                else (flat_got[k] == want)
            ), (part, k)
    if backend == "cloudckpt":
        # The ranks resolved the ref to different versions (a save landed in between):
        # every rank loads the coordinator's.
        ids = json.loads(Path(root, "versions.json").read_text())
        mine = CloudStorageReader(f"file://{root}/two", ref=ids[dist.get_rank()])
        both = {"m": distribute_tensor(torch.zeros(8, 4), mesh, [Replicate()])}
        dcp.load(both, storage_reader=mine)
        assert torch.equal(both["m"].full_tensor(), matrix()), both["m"].full_tensor()
    return {"resharded": True}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main() -> None:
    backend, root, phase = sys.argv[1:4]
    dist.init_process_group("gloo")
    try:
        result = {"save": save, "reshard": reshard}[phase](backend, root)
        dist.barrier()
        if dist.get_rank() == 0:
            print(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
