"""The Hugging Face ``Trainer``: every checkpoint it saves is also committed to a
cloudckpt repository, and a run on a new machine resumes from it.

    from cloudckpt.integrations.transformers import CloudCheckpointCallback

    callback = CloudCheckpointCallback("s3://bucket/runs/hf")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=callback.resume(trainer))  # None on a fresh run

Each commit holds the model, optimizer and scheduler state, the ``TrainerState`` and
the RNG states (unchanged tensors are not uploaded again). ``resume`` downloads the
newest version and lays it out as ``<output_dir>/checkpoint-<step>`` the way the Trainer
reads it, so the Trainer's own resume logic (skipping the batches already seen,
restoring the RNG) does the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from cloudckpt import CheckpointNotFound, CorruptCheckpoint, Repo, RepoOptions, Version

log = logging.getLogger("cloudckpt")

__all__ = ["CloudCheckpointCallback"]


class CloudCheckpointCallback(TrainerCallback):
    """Commits each Trainer save to the repository at ``uri`` (on the main process)."""

    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        branch: str = "main",
        options: RepoOptions | None = None,
    ) -> None:
        self.repo = Repo(uri, storage_options, options=options)
        self.branch = branch

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or model is None:
            return
        snapshot = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else {},
            "trainer_state": json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True),
            # The Trainer's rng_state.pth layout (CPU; this process's RNG just after it
            # wrote its own copy).
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "cpu": torch.random.get_rng_state(),
            },
        }
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        version = self.repo.commit(
            snapshot,
            branch=self.branch,
            step=state.global_step,
            fast_forward=True,
            metrics={"loss": losses[-1]} if losses else None,
            message=f"checkpoint-{state.global_step}",
        )
        log.info("committed checkpoint-%d as %s", state.global_step, version.id)

    def resume(self, trainer: Trainer) -> str | None:
        """Lay the newest version out as ``<output_dir>/checkpoint-<step>`` and return that
        path for ``trainer.train(resume_from_checkpoint=...)``; None if there is none.

        A version that does not verify or does not fit the model is passed over for its
        parent (logged); nothing is written outside ``output_dir``."""
        index = self.repo.index()
        try:
            self.repo.resolve(self.branch, index)
        except CheckpointNotFound:
            return None
        # Not inside the try: a version that cannot load must not look like a fresh run.
        version, out, _ = self.repo.newest_good(
            self.branch, lambda v: self._lay_out(v, trainer), index
        )
        log.info("resuming from %s (step %s) laid out in %s", version.id, version.step, out)
        return str(out)

    def _lay_out(self, version: Version, trainer: Trainer) -> Path:
        where = f"{self.repo.uri} version {version.id}"
        if type(version.step) is not int or version.step < 0:
            raise CorruptCheckpoint(f"{where}: records step {version.step!r}, not a step count")
        root = Path(trainer.args.output_dir).resolve()
        out = (root / f"checkpoint-{version.step}").resolve()
        if out.parent != root:  # the step is an int; this holds, and is checked all the same
            raise CorruptCheckpoint(f"{where}: {out} is not a checkpoint directory of {root}")
        # The weights go straight into the model's own tensors (and must fit it).
        state = self.repo.load(version.id, into={"model": trainer.model})
        parts = {
            "model": dict,
            "optimizer": dict,
            "scheduler": dict,
            "trainer_state": str,
            "rng": dict,
        }
        wrong = [k for k, kind in parts.items() if not isinstance(state.get(k), kind)]
        if not isinstance(state, dict) or wrong:
            raise CorruptCheckpoint(f"{where} is not a Trainer checkpoint (bad {wrong})")
        try:
            json.loads(state["trainer_state"])
            state["trainer_state"].encode()  # a lone surrogate is valid JSON, not UTF-8
        except ValueError as e:
            raise CorruptCheckpoint(f"{where}: its trainer_state is not JSON ({e})") from None
        # Laid out beside the target and renamed into place: the Trainer never finds a
        # half-written checkpoint directory.
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=root))
        try:
            trainer.model.save_pretrained(staging)  # the Trainer reads the weights from here
            # Written here from verified, plain data; the Trainer reads them weights_only.
            torch.save(state["optimizer"], staging / "optimizer.pt")
            torch.save(state["scheduler"], staging / "scheduler.pt")
            torch.save(state["rng"], staging / "rng_state.pth")
            (staging / "trainer_state.json").write_text(state["trainer_state"])
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out
