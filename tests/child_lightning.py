"""A Lightning run checkpointing through cloudckpt, for test_integrations_lightning.py.

Usage: python child_lightning.py ROOT_URI EPOCHS OUT [--kill-in-epoch N] [--async] [--resume]
Saves the final weights to OUT (safetensors). With --kill-in-epoch, SIGKILLs itself in
the middle of that epoch (0-based), like a machine that vanished.
"""

from __future__ import annotations

import argparse
import os
import signal

import lightning.pytorch as pl
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from cloudckpt.integrations.lightning import (
    AsyncCloudCheckpointIO,
    CloudCheckpointIO,
    ModelCheckpoint,
)


class Regression(pl.LightningModule):
    def __init__(self, kill_in_epoch: int | None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )
        self.kill_in_epoch = kill_in_epoch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
        if self.current_epoch == self.kill_in_epoch and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("epochs", type=int)
    p.add_argument("out")
    p.add_argument("--kill-in-epoch", type=int)
    p.add_argument("--async", dest="use_async", action="store_true")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 8, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    io = AsyncCloudCheckpointIO() if a.use_async else CloudCheckpointIO()
    trainer = pl.Trainer(
        default_root_dir=a.root,
        max_epochs=a.epochs,
        logger=False,
        plugins=[io],
        callbacks=[
            ModelCheckpoint(
                save_last=True, save_top_k=1, monitor="epoch", mode="max", every_n_epochs=1
            )
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    model = Regression(a.kill_in_epoch)
    trainer.fit(model, data, ckpt_path="last" if a.resume else None)
    print(f"resumed from {io.resumed_from}", flush=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, a.out)


if __name__ == "__main__":
    main()
