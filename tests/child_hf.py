"""A Hugging Face Trainer run committing through cloudckpt, for test_integrations_transformers.

Usage: python child_hf.py URI OUT [--kill-at STEP] [--resume]
Runs in its own empty working directory (a new machine); saves final weights to OUT.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from safetensors.torch import save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from cloudckpt.integrations.transformers import CloudCheckpointCallback


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = torch.randint(0, 64, (48, 17), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


class KillAt(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("out")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir="out",
        max_steps=24,
        save_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        report_to="none",
        use_cpu=True,
        seed=0,
        logging_steps=5,
        disable_tqdm=True,
        save_total_limit=2,
    )
    callback = CloudCheckpointCallback(a.uri)
    trainer = Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[callback, KillAt(a.kill_at)]
    )
    start = callback.resume(trainer) if a.resume else None
    print(f"resuming from {start}", flush=True)
    trainer.train(resume_from_checkpoint=start)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}, a.out
    )


if __name__ == "__main__":
    main()
