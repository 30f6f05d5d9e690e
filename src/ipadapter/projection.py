"""Image projections: encoder features -> image-prompt tokens in the UNet's context space.

Every projection takes the same call, `forward(image=None, face_id=None)`, and returns tokens of shape
(B, num_tokens, cross_attention_dim). Parameter names follow the official modules so that official `image_proj`
state dicts load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdapterConfig
from .resampler import PerceiverStack, Resampler


_EXPECTS = {
    ("image", 2): "pooled image embeddings (batch, dim)",
    ("image", 3): "penultimate hidden states (batch, tokens, dim)",
    ("face_id", 2): "face-identity embeddings (batch, 512)",
    ("face_id", 3): "face-identity embeddings (batch, faces, 512)",
}


def _require(name: str, value: torch.Tensor | None, ndim: tuple[int, ...], projection: str) -> torch.Tensor:
    wanted = " or ".join(_EXPECTS[(name, n)] for n in ndim)
    if value is None:
        raise ValueError(f"the {projection} projection needs {wanted} as `{name}`, found None")
    if value.ndim not in ndim:
        found = _EXPECTS.get((name, value.ndim), f"a {value.ndim}-d tensor")
        raise ValueError(
            f"the {projection} projection needs {wanted} as `{name}`; found {found.split(' (')[0]} of shape "
            f"{tuple(value.shape)}"
        )
    return value


class LinearProjection(nn.Module):
    """Pooled image embedding -> `num_tokens` tokens: Linear + LayerNorm (paper §3.2.1, official `ImageProjModel`)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image: torch.Tensor | None = None, face_id: torch.Tensor | None = None) -> torch.Tensor:
        x = _require("image", image, (2,), "linear")  # (B, D)
        x = self.proj(x.to(self.proj.weight.dtype))  # (B, T*C)
        x = x.reshape(-1, self.num_tokens, self.cross_attention_dim)  # (B, T, C)
        return self.norm(x)


class MLPProjection(nn.Module):
    """Full-face projection: every penultimate token through Linear-GELU-Linear-LayerNorm (official `MLPProjModel`)."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(image_embed_dim, image_embed_dim),
            nn.GELU(),
            nn.Linear(image_embed_dim, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, image: torch.Tensor | None = None, face_id: torch.Tensor | None = None) -> torch.Tensor:
        x = _require("image", image, (3,), "mlp")  # (B, 257, D)
        return self.proj(x.to(self.proj[0].weight.dtype))  # (B, 257, C)


class ResamplerProjection(Resampler):
    """IP-Adapter-Plus: 16 learned queries over the penultimate hidden states (paper §4.4.2)."""

    def forward(self, image: torch.Tensor | None = None, face_id: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x = _require("image", image, (3,), "resampler")  # (B, N, D)
        return super().forward(x.to(self.proj_in.weight.dtype))  # (B, Q, C)


class FaceIDProjection(nn.Module):
    """Face-identity embedding -> tokens: Linear-GELU-Linear, reshape, LayerNorm (official FaceID `MLPProjModel`).

    A (B, n, id_dim) input holds n faces per sample (FaceID-Portrait); their tokens are concatenated to
    (B, n * num_tokens, C), as the official `ip_adapter_faceid_separate.py` does.
    """

    def __init__(self, id_embed_dim: int, id_hidden_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Sequential(
            nn.Linear(id_embed_dim, id_hidden_dim),
            nn.GELU(),
            nn.Linear(id_hidden_dim, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def id_tokens(self, face_id: torch.Tensor) -> torch.Tensor:
        """(B, id_dim) -> (B, T, C)."""
        x = self.proj(face_id.to(self.proj[0].weight.dtype))  # (B, T*C)
        return self.norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))  # (B, T, C)

    def forward(self, image: torch.Tensor | None = None, face_id: torch.Tensor | None = None) -> torch.Tensor:
        x = _require("face_id", face_id, (2, 3), "faceid")
        if x.ndim == 2:
            return self.id_tokens(x)
        b, n, d = x.shape
        tokens = self.id_tokens(x.reshape(b * n, d))  # (B*n, T, C)
        return tokens.reshape(b, n * self.num_tokens, self.cross_attention_dim)  # (B, n*T, C)


class FaceIDPlusProjection(FaceIDProjection):
    """FaceID-Plus(V2): identity tokens are the queries of a perceiver over the face crop's CLIP tokens.

    With `shortcut` (PlusV2) the output is `id_tokens + s_scale * perceiver(id_tokens, clip)`; without it the
    perceiver output alone (official `ProjPlusModel`). `s_scale` weighs the face-structure (CLIP) branch against the
    identity: official `generate(s_scale=...)`, ComfyUI's `weight_faceidv2`, diffusers' `shortcut_scale`.
    """

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__(cfg.id_embed_dim, cfg.id_hidden_dim, cfg.cross_attention_dim, cfg.num_tokens)
        assert cfg.resampler is not None  # guaranteed by AdapterConfig validation
        self.perceiver_resampler = PerceiverStack(cfg.resampler, cfg.image_embed_dim, cfg.cross_attention_dim)
        self.shortcut = cfg.shortcut
        self.s_scale = 1.0  # runtime weight of the CLIP (structure) branch for PlusV2; not a parameter

    def forward(self, image: torch.Tensor | None = None, face_id: torch.Tensor | None = None,
                s_scale: float | None = None) -> torch.Tensor:  # fmt: skip
        ids = _require("face_id", face_id, (2,), "faceid_plus")  # (B, id_dim)
        clip = _require("image", image, (3,), "faceid_plus")  # (B, N, D)
        x = self.id_tokens(ids)  # (B, T, C)
        out = self.perceiver_resampler(x, clip.to(x.dtype))  # (B, T, C)
        return x + (self.s_scale if s_scale is None else s_scale) * out if self.shortcut else out


def build_projection(cfg: AdapterConfig) -> nn.Module:
    """Builds the (randomly initialised) projection module that `cfg` describes."""
    if cfg.projection == "linear":
        return LinearProjection(cfg.image_embed_dim, cfg.cross_attention_dim, cfg.num_tokens)
    if cfg.projection == "mlp":
        return MLPProjection(cfg.image_embed_dim, cfg.cross_attention_dim)
    if cfg.projection == "resampler":
        assert cfg.resampler is not None
        return ResamplerProjection(cfg.resampler, cfg.num_tokens, cfg.image_embed_dim, cfg.cross_attention_dim)
    if cfg.projection == "faceid":
        return FaceIDProjection(cfg.id_embed_dim, cfg.id_hidden_dim, cfg.cross_attention_dim, cfg.num_tokens)
    if cfg.projection == "faceid_plus":
        return FaceIDPlusProjection(cfg)
    raise ValueError(f"unknown projection {cfg.projection!r}")
