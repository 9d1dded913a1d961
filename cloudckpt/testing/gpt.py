"""A small GPT-2-style language model in plain torch, for tests, examples and benchmarks.

``GPTConfig.gpt2_small()`` has GPT-2 small's shapes (~124M parameters); the default is
tiny enough to train at several steps per second on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0

    @classmethod
    def gpt2_small(cls) -> GPTConfig:
        return cls(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )
        self.n_head = cfg.n_head
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Decoder-only transformer; the output head shares the token embedding (tied)."""

    def __init__(self, cfg: GPTConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or GPTConfig()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits, or the mean cross-entropy loss when ``targets`` is given."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_state(
    cfg: GPTConfig | None = None, steps: int = 2, seed: int = 0, batch: int = 2
) -> dict:
    """A GPT and its AdamW state after ``steps`` real steps on random tokens, as a
    ``{"model", "optimizer", "step"}`` state dict."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    c = model.cfg
    for _ in range(steps):
        idx = torch.randint(0, c.vocab_size, (batch, min(c.block_size, 32)))
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps}


#: The benchmarks' model sizes: GPT-2 small (124M parameters) and two small ones.
PRESETS = {
    "gpt2": GPTConfig.gpt2_small,
    "small": lambda: GPTConfig(n_layer=4, n_embd=256),
    "tiny": lambda: GPTConfig(n_layer=2, n_embd=64),
}


def benchmark_model(preset: str = "gpt2") -> tuple[GPT, torch.optim.Optimizer]:
    """A GPT of one of :data:`PRESETS` (block size 64) and its AdamW after one real step:
    the training state every benchmark measures (GPT-2 small: 1.48 GB of tensors)."""
    torch.manual_seed(0)
    cfg = GPTConfig(**{**PRESETS[preset]().__dict__, "block_size": 64})
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (2, 33))
    model(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt
