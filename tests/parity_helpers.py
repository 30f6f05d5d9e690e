"""Shared pieces of the pipeline-level parity tests against diffusers' built-in IP-Adapter (tiny random models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny_models import make_sd_folder, make_sdxl_folder, tiny_clip_vision

from ipadapter import IPAdapter, ImageEncoder

STEPS = 3


def save_adapters(unet, encoder: ImageEncoder, root: Path, variants: dict[str, int], spread: float = 0.2) -> None:
    """Random official-layout adapters `root/{variant}.bin`, each moved off its init (seed per variant)."""
    for variant, seed in variants.items():
        torch.manual_seed(seed)
        feature = {"base": "pooled", "faceid": None}.get(variant, "penultimate")
        adapter = IPAdapter.for_unet(unet, variant, image_embed_dim=feature and encoder.feature_dim(feature))
        # FaceID's rank-128 LoRA on 32-wide layers: larger moves make the tiny UNet chaotic (float rounding of the
        # first layer, 4e-6, grew to 5 at the last with 0.2), so they get less
        amount = 0.1 if variant.startswith("faceid") else spread
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(amount * torch.randn_like(p))
        adapter.save(root / f"{variant}.bin", layout="official")


def sd_folders(root: Path, variants=None) -> tuple[Path, str, str]:
    """Tiny SD1.5 folder, its image encoder and official-layout adapters in `root`."""
    from diffusers import UNet2DConditionModel

    base, encoder_folder = make_sd_folder(root)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    save_adapters(unet, ImageEncoder.from_pretrained(encoder_folder), root, variants or {"base": 1, "plus": 2})
    return root, base, encoder_folder


def sdxl_folders(root: Path, variants=None) -> tuple[Path, str, str]:
    from diffusers import UNet2DConditionModel

    base = make_sdxl_folder(root)
    tiny_clip_vision(image_size=28).save_pretrained(root / "image_encoder")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    save_adapters(unet, ImageEncoder.from_pretrained(root / "image_encoder"), root, variants or {"base": 5, "plus": 6})
    return root, base, str(root / "image_encoder")


def theirs(cls, base, encoder_folder, root, weight_name, **extra):
    """A diffusers pipeline with its built-in IP-Adapter(s) loaded from `root`."""
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    pipe = cls.from_pretrained(base, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder_folder),
                               feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                                    crop_size={"height": 28, "width": 28}),
                               **extra)  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(root), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    return pipe


def ours(cls, base, **extra):
    from diffusers import DDIMScheduler

    pipe = cls.from_pretrained(base, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refs():
    a = Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 20).convert("RGB")
    b = Image.linear_gradient("L").resize((32, 32)).convert("RGB")
    c = Image.radial_gradient("L").resize((32, 32)).convert("RGB")
    return a, b, c


def half_masks(size: int = 16) -> torch.Tensor:
    """diffusers-preprocessed (2, 1, size, size) masks: the left half, the right half."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    left = np.zeros((size, size), np.uint8)
    left[:, : size // 2] = 255
    return IPAdapterMaskProcessor().preprocess([Image.fromarray(left), Image.fromarray(255 - left)], height=size,
                                               width=size)  # fmt: skip


def run(pipe, seed: int = 1, **kwargs):
    kwargs.setdefault("prompt", "a red shape")
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe(output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
