"""Low-rank adapters on a UNet attention's q/k/v/out projections (the FaceID LoRA, rank 128 in official files)."""

from __future__ import annotations

import torch
from torch import nn


class LoRALinear(nn.Module):
    """x -> up(down(x)); down: (rank, in), up: (out, rank), no biases, `up` zero-initialised (identity at start)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.down(x.to(dtype))).to(x.dtype)


class AttentionLoRA(nn.Module):
    """The four LoRA deltas of one attention layer, named as in official FaceID checkpoints."""

    def __init__(self, hidden_size: int, context_dim: int, rank: int) -> None:
        super().__init__()
        self.to_q_lora = LoRALinear(hidden_size, hidden_size, rank)
        self.to_k_lora = LoRALinear(context_dim, hidden_size, rank)
        self.to_v_lora = LoRALinear(context_dim, hidden_size, rank)
        self.to_out_lora = LoRALinear(hidden_size, hidden_size, rank)
