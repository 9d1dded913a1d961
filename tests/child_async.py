"""Commits one small version, then starts a large async save and prints "uploading"."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from cloudckpt import CheckpointManager, HealthCheck, RepoOptions, TransferOptions


class Holder:
    def __init__(self) -> None:
        self.tensors = {"w": torch.zeros(4)}

    def state_dict(self) -> dict:
        return self.tensors

    def load_state_dict(self, state: dict) -> None:
        self.tensors = state


def main() -> None:
    holder = Holder()
    options = RepoOptions(transfer=TransferOptions(chunk_size=1 << 20))
    mgr = CheckpointManager(
        sys.argv[1], async_save=True, options=options, health=HealthCheck(spike_factor=1e9)
    )
    mgr.restore(holder=holder)
    mgr.step(1)
    mgr.save("small", sync=True)
    # A slow link: each blob of the large save takes a second, so the test's SIGKILL lands
    # mid-upload however loaded the machine is (it fired after the upload ended, once).
    store = mgr.repo.store
    put = store.put

    def slow_put(key: str, data: Any) -> None:
        if key.startswith("blobs/"):
            time.sleep(1.0)
        put(key, data)

    store.put = slow_put  # type: ignore[method-assign]
    torch.manual_seed(0)
    holder.tensors = {"w": torch.randn(96 << 20 >> 2)}  # 96 MiB of incompressible floats
    mgr.step(2)
    mgr.save("large")
    print("uploading", flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
