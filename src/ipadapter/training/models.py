"""The frozen models a training run needs, loaded from a diffusers folder / hub id (SD1.5 family or SDXL)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..encoders import ImageEncoder
from ..sources import diffusers_dtype, resolve_base, resolve_image_encoder



@dataclass
class FrozenModels:
    """UNet, VAE, text encoder(s), tokenizer(s), noise scheduler and image encoder; all frozen."""

    unet: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]  # one (SD1.5) or two (SDXL)
    tokenizers: list  # matching tokenizers
    noise_scheduler: object  # DDPMScheduler built from the base model's scheduler config
    image_encoder: ImageEncoder | None  # None for FaceID (face embeddings come precomputed)

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    def frozen(self) -> list[nn.Module]:
        mods = [self.unet, self.vae, *self.text_encoders]
        return mods + ([self.image_encoder.model] if self.image_encoder is not None else [])


def load_frozen_models(base: str, image_encoder: str, needs_encoder: bool, dtype: torch.dtype = torch.float32) -> FrozenModels:
    """Loads every frozen component; raises FileNotFoundError/ValueError naming what is missing."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = resolve_base(base)
    if Path(path).exists() and not (Path(path) / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers model folder: expected unet/config.json inside it")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **diffusers_dtype(torch.float32))
    sdxl = (Path(path) / "text_encoder_2").is_dir() or unet.config.addition_embed_type == "text_time"
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **diffusers_dtype(dtype))
    if sdxl and vae.config.force_upcast and vae.dtype != torch.float32:
        # SDXL's VAE overflows in float16; its config says so (force_upcast) and the official SDXL trainer keeps it
        # in float32 ("vae of sdxl should use fp32"). A fixed VAE (force_upcast false) stays in the run's precision.
        vae = vae.to(torch.float32)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer")]
    text_encoders: list[nn.Module] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)]
    if sdxl:
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype))
    encoder = None
    if needs_encoder:
        encoder_path = resolve_image_encoder(base, image_encoder)
        if not encoder_path:
            raise ValueError(
                "this variant needs a CLIP image encoder: pass --image-encoder (a folder or hub id, e.g. "
                "h94/IP-Adapter with subfolder models/image_encoder)"
            )
        encoder = ImageEncoder.from_pretrained(encoder_path, dtype=dtype)  # "repo::subfolder" allowed
    models = FrozenModels(unet, vae, text_encoders, tokenizers, noise_scheduler, encoder)
    for module in models.frozen():
        module.requires_grad_(False).eval()
    return models


@torch.no_grad()
def encode_text(models: FrozenModels, input_ids: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text states (B, L, C) for the UNet and, for SDXL, the pooled text embedding (B, 1280).

    SD1.5: last hidden state of the text encoder. SDXL: penultimate hidden states of both encoders concatenated,
    pooled projection of the second (as the official SDXL trainer and pipeline)."""
    if not models.is_sdxl:
        return models.text_encoders[0](input_ids[0].to(models.text_encoders[0].device))[0], None
    states, pooled = [], None
    for encoder, ids in zip(models.text_encoders, input_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(states, dim=-1), pooled


def tokenize_fn(tokenizers: list):
    """caption -> tuple of (L,) id tensors, one per tokenizer (padded to the tokenizer's max length)."""

    def tokenize(text: str) -> tuple[torch.Tensor, ...]:
        return tuple(
            tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids[0]
            for tok in tokenizers
        )

    return tokenize
