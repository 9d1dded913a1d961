"""A zygote for the crash harness: imports torch and cloudckpt once, then forks one child
per scenario, which SIGKILLs itself at a chosen point (or is SIGKILLed after a delay).

Reads one JSON scenario per line on stdin, answers one JSON line per scenario:
``{"status": <waitpid status as returncode>, "reached": bool}``.

A scenario: ``{"uri", "env", "action": "commit"|"collect"|"tier_save"|"tier_upload",
"point": [what, n, "before"|"after"] or null, "after_seconds": float or null}`` (and
``"local"``, the local tier's path, for the tier actions). ``what`` names a store call
(``put``, ``put_if_absent``, ``put_if_match``, ``read_versioned``, ``delete``), an S3
multipart call (``create_multipart_upload``, ``upload_part``, ``complete_multipart_upload``)
or an Azure block call (``stage_block``, ``commit_block_list``).

The tier actions run a CheckpointManager with a local tier (:func:`tier_manager`) over a
bucket step 1 uploaded from the tier: ``tier_save`` saves step 2 to the local tier only,
``tier_upload`` saves step 2 to the bucket (locally first, then uploaded from there). Their
kill points count from the save on (not the restore before it), over the calls of both
stores -- the local tier's and the bucket's go through the same Store class.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import torch
from processes import wait_forked

import cloudckpt.store.s3_multipart as multipart
from cloudckpt import Repo, RepoOptions, TransferOptions
from cloudckpt.store import Store, StoreOptions
from cloudckpt.store.azure import AzureBackend

MiB = 1 << 20
OPTIONS = RepoOptions(
    transfer=TransferOptions(chunk_size=16 * MiB, workers=1),
    store=StoreOptions(part_size=5 * MiB),
)
STORE_CALLS = ("put", "put_if_absent", "put_if_match", "read_versioned", "delete")
AZURE_BLOCK_CALLS = ("stage_block", "commit_block_list")


def state(step: int) -> dict[str, Any]:
    """Step 1 and step 2 share ``frozen``; ``big`` (16 MiB) goes up in multipart parts."""
    g = torch.Generator().manual_seed(step)
    return {
        "model": {
            "frozen": torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)),
            "big": torch.randn(4 * MiB, generator=g),
            "w1": torch.randn(512, 1024, generator=g),
            "w2": torch.randn(512, 1024, generator=g),
            "bias": torch.randn(64, generator=g),
        },
        "step": step,
    }


#: The local tier's writes: one worker, so the kill points are the same on every run.
TIER_TRANSFER = TransferOptions(chunk_size=16 * MiB, workers=1, compress=False)


def tier_state(step: int) -> dict[str, torch.Tensor]:
    """A smaller state for the tier actions (each writes it twice: locally, then to the
    bucket); ``big`` (13 MiB) goes up to the bucket in three multipart parts."""
    g = torch.Generator().manual_seed(step)
    return {
        "frozen": torch.randn(256 * 1024, generator=torch.Generator().manual_seed(0)),
        "big": torch.randn(13 * MiB // 4, generator=g),
        "w1": torch.randn(64 * 1024, generator=g),
        "bias": torch.randn(64, generator=g),
    }


class TierModel(torch.nn.Module):
    """A module holding :func:`tier_state` as buffers (what the manager saves)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        for name, tensor in tier_state(step).items():
            self.register_buffer(name, tensor)


def tier_manager(
    uri: str, local: str, save_every_steps: int, storage_options: dict[str, Any] | None = None
) -> Any:
    """The manager of the tier actions (host ``h0``, one local version kept, so every
    local save prunes and collects; no lease, so a kill leaves none to wait out)."""
    from cloudckpt import CheckpointManager, LocalTier

    tier = LocalTier(local, every_steps=1, keep=1, host="h0", transfer=TIER_TRANSFER)
    return CheckpointManager(
        uri,
        storage_options,
        save_every_steps=save_every_steps,
        local=tier,
        exclusive=False,
        options=OPTIONS,
    )


def _install(point: list[Any]) -> None:
    what, n, when = point
    calls: Counter[str] = Counter()

    def check(name: str, moment: str) -> None:
        if name == what and calls[name] == n and moment == when:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(name: str, fn: Any) -> Any:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            check(name, "before")
            out = fn(*args, **kwargs)
            check(name, "after")
            return out

        return hooked

    for name in STORE_CALLS:
        setattr(Store, name, wrap(name, getattr(Store, name)))
    for name in AZURE_BLOCK_CALLS:
        setattr(AzureBackend, name, wrap(name, getattr(AzureBackend, name)))
    raw = multipart._s3

    def s3(fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return wrap(method, raw)(fs, method, *args, **kwargs)

    multipart._s3 = s3


def run(scenario: dict[str, Any]) -> None:
    os.environ.update(scenario["env"])
    torch.set_num_threads(1)
    if scenario["action"] in ("tier_save", "tier_upload"):
        _tier_step(scenario)
    else:
        if scenario.get("point"):
            _install(scenario["point"])
        repo = Repo(scenario["uri"], options=OPTIONS)
        if scenario["action"] == "commit":
            repo.commit(state(2), step=2)
        else:  # delete the oldest version, then collect with no grace
            repo.delete([repo.versions()[0].id])
            repo.gc(grace=0)
    if scenario.get("after_seconds") is not None:
        time.sleep(30)  # a timed kill must find it alive


def _tier_step(scenario: dict[str, Any]) -> None:
    """Restore step 1, then step 2: a bucket save with save_every_steps=2 (tier_upload), a
    local one only with 100 (tier_save). The kill points count from the save on."""
    every = 2 if scenario["action"] == "tier_upload" else 100
    mgr = tier_manager(scenario["uri"], scenario["local"], every)
    model = TierModel(0)
    assert mgr.restore(model=model).step == 1
    model.load_state_dict(tier_state(2))
    if scenario.get("point"):
        _install(scenario["point"])
    saved = mgr.step(2).saved
    assert saved is not None and saved.tier == ("bucket" if every == 2 else "local")


def main() -> None:
    for line in sys.stdin:
        scenario = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                run(scenario)
                code = 0
            except BaseException as e:
                print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        if scenario.get("after_seconds") is not None:
            time.sleep(scenario["after_seconds"])
            os.kill(pid, signal.SIGKILL)
        code, _ = wait_forked(pid, timeout=60)
        out = {"returncode": code, "seconds": time.monotonic() - started}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
