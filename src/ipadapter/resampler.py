"""Perceiver resampler: a few learned queries read many image tokens (paper §4.4.2, IP-Adapter-Plus).

Module and parameter names follow the official `resampler.py`, so official checkpoints load without renaming:
`layers.{i}.0` is the attention (norm1, norm2, to_q, to_kv, to_out) and `layers.{i}.1` the feed-forward
(`.0` LayerNorm, `.1` Linear, `.2` GELU, `.3` Linear).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ResamplerConfig


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim), no biases (official `FeedForward`)."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to the image tokens and to themselves (keys/values from concat(image, latents))."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.dim_head = dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # on image tokens
        self.norm2 = nn.LayerNorm(dim)  # on latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.dim_head).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) image tokens; latents: (B, Q, D). Returns (B, Q, D)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, q_len, _ = latents.shape
        q = self._heads(self.to_q(latents))  # (B, H, Q, Dh)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)  # each (B, N+Q, H*Dh)
        k, v = self._heads(k), self._heads(v)  # (B, H, N+Q, Dh)
        # q and k are each scaled by dim_head**-0.25 (official: "more stable with f16 than dividing afterwards").
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)  # (B, H, Q, N+Q)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = weight @ v  # (B, H, Q, Dh)
        out = out.transpose(1, 2).reshape(b, q_len, -1)  # (B, Q, H*Dh)
        return self.to_out(out)


class PerceiverStack(nn.Module):
    """proj_in -> depth x (attention + feed-forward, residual) over given latents -> proj_out -> norm_out."""

    def __init__(self, cfg: ResamplerConfig, embedding_dim: int, output_dim: int) -> None:
        super().__init__()
        self._build(cfg, embedding_dim, output_dim)

    def _build(self, cfg: ResamplerConfig, embedding_dim: int, output_dim: int) -> None:
        # Registration order = official state_dict order (proj_in, proj_out, norm_out, layers).
        self.proj_in = nn.Linear(embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """latents: (B, Q, dim); x: (B, N, embedding_dim). Returns (B, Q, output_dim)."""
        x = self.proj_in(x)  # (B, N, dim)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class Resampler(PerceiverStack):
    """IP-Adapter-Plus projection: `num_queries` learned latents read the encoder's penultimate tokens."""

    def __init__(self, cfg: ResamplerConfig, num_queries: int, embedding_dim: int, output_dim: int) -> None:
        nn.Module.__init__(self)
        # Official init: randn / sqrt(dim); registered first, as in the official state_dict.
        self.latents = nn.Parameter(torch.randn(1, num_queries, cfg.dim) / cfg.dim**0.5)
        self._build(cfg, embedding_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x: (B, N, embedding_dim) penultimate hidden states. Returns (B, num_queries, output_dim)."""
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, Q, dim)
        return super().forward(latents, x)
