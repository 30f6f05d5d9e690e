"""Saving and loading precomputed image-prompt embeddings (encoder features) as safetensors.

What is stored is the frozen image encoder's output (pooled `image_embeds` or penultimate hidden states), before
any adapter projection, so one file serves every adapter that reads the same encoder and feature. The header
records which encoder and feature produced it; loading checks that against the adapter that will use it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import read_tensors
from .config import AdapterConfig, image_encoder_name
from .files import save_safetensors

FORMAT = "ipadapter-embeds/1"


def save_embeds(path: str | os.PathLike, features: torch.Tensor, feature: str, encoder: str = "",
                unconditional: torch.Tensor | None = None) -> None:  # fmt: skip
    """Writes features (K, D) or (K, N, D) of K references; `encoder` names the image encoder (folder or hub id).
    `unconditional`: the encoder's features of the empty image (`ImageEncoder.unconditional(feature)`), so that the
    file alone serves a generation with guidance, with no encoder loaded (penultimate features need it: it is the
    encoding of zero normalised pixels, the encoder's mean grey, not zero features)."""
    if feature not in ("pooled", "penultimate"):
        raise ValueError(f"feature must be 'pooled' or 'penultimate', found {feature!r}")
    expected_ndim = 2 if feature == "pooled" else 3
    if features.ndim != expected_ndim:
        raise ValueError(f"{feature} features must have {expected_ndim} axes, found shape {tuple(features.shape)}")
    tensors = {"features": features.detach().to("cpu").contiguous()}
    if unconditional is not None:
        if tuple(unconditional.shape) != (1, *features.shape[1:]):
            raise ValueError(f"unconditional features must be (1, {', '.join(map(str, features.shape[1:]))}), found "
                             f"{tuple(unconditional.shape)}")  # fmt: skip
        tensors["unconditional"] = unconditional.detach().to("cpu", features.dtype).contiguous()
    meta = {"format": FORMAT, "feature": feature, "encoder": encoder, "width": str(features.shape[-1])}
    save_safetensors(tensors, path, meta)


def load_unconditional(path: str | os.PathLike) -> torch.Tensor | None:
    """The (1, ...) unconditional features an embeddings file holds, or None (written without them)."""
    tensors, _ = _read(path, shapes_only=False)
    return tensors.get("unconditional")


def has_unconditional(path: str | os.PathLike) -> bool:
    return "unconditional" in _read(path, shapes_only=True)[0]


def load_embeds(path: str | os.PathLike, config: AdapterConfig | None = None) -> tuple[torch.Tensor, dict[str, str]]:
    """Reads features and their header; with `config`, checks they are what that adapter reads.

    Raises:
        FileNotFoundError / ValueError: a missing or unreadable file, not an embeddings file, or features from
            another feature kind or encoder width than the adapter's.
    """
    tensors, meta = _read(path, shapes_only=False)
    if config is not None:
        _check(path, tensors["features"], meta, config)
    features = tensors["features"]
    return features, dict(meta)


def check_embeds(path: str | os.PathLike, config: AdapterConfig) -> None:
    """`load_embeds(path, config)`'s checks from the file's header alone (nothing is read but shapes)."""
    tensors, meta = _read(path, shapes_only=True)
    _check(path, tensors["features"], meta, config)


def _read(path: str | os.PathLike, shapes_only: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = read_tensors(Path(path), shapes_only=shapes_only)  # clear errors for missing / corrupt files
    if meta.get("format") != FORMAT or "features" not in tensors:
        raise ValueError(f"{path} is not an image-prompt embeddings file (expected format {FORMAT}, found "
                         f"{meta.get('format')!r} with tensors {sorted(tensors)[:4]})")  # fmt: skip
    return tensors, meta


def _check(path: str | os.PathLike, features: torch.Tensor, meta: dict[str, str], config: AdapterConfig) -> None:
    if config.image_feature != meta["feature"] or config.image_embed_dim != features.shape[-1]:
        raise ValueError(
            f"{path} holds {features.shape[-1]}-d {meta['feature']} features "
            f"({image_encoder_name(meta['feature'], features.shape[-1])}, encoder {meta.get('encoder') or '?'}); "
            f"this adapter ({config.variant}) reads {config.image_embed_dim}-d {config.image_feature} features "
            f"({config.image_encoder_name})"
        )
