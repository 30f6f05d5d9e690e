"""Validation during training: generate from fixed references, score CLIP image similarity, save a grid."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image

from .data import Record, open_image


def build_pipeline(models):
    """A diffusers pipeline over the frozen training models (DDIM sampling)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler.from_config(models.noise_scheduler.config)
    if models.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=models.vae, text_encoder=models.text_encoders[0], text_encoder_2=models.text_encoders[1],
            tokenizer=models.tokenizers[0], tokenizer_2=models.tokenizers[1], unet=models.unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=models.vae, text_encoder=models.text_encoders[0], tokenizer=models.tokenizers[0], unet=models.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def clip_image_similarity(encoder, generated: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean cosine similarity of pooled CLIP image embeddings, generated[i] vs references[i] (CLIP-I)."""
    a = encoder.encode(generated, "pooled").float()
    b = encoder.encode(references, "pooled").float()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


@torch.no_grad()
def validate(trainer, records: list[Record]) -> float | None:
    """Image-only generations (scale 1, empty text) from each validation reference; returns CLIP-I or None."""
    from ..prompter import ImagePrompter

    models, cfg = trainer.models, trainer.cfg
    references = [img for img in (open_image(r) for r in records) if img is not None]
    if not references or models.image_encoder is None:
        return None
    adapter = trainer.accelerator.unwrap_model(trainer.module).adapter
    adapter.eval()
    pipe = build_pipeline(models)
    pipe.set_progress_bar_config(disable=True)
    prompter = ImagePrompter(pipe, adapter, models.image_encoder)
    # With mixed precision the frozen encoders are half precision and the UNet float32, as in training, where
    # Accelerate's autocast joins them: generate under the same autocast.
    dtype = trainer._weight_dtype()
    amp = torch.autocast(trainer.accelerator.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    generated = []
    for i, reference in enumerate(references):
        g = torch.Generator("cpu").manual_seed((cfg.seed + i) % 2**64)
        with amp:
            out = prompter(image=reference, prompt="", scale=1.0, num_inference_steps=cfg.validation_steps,
                           height=cfg.resolution, width=cfg.resolution, generator=g)
        generated.append(out.images[0])
    adapter.train()
    score = clip_image_similarity(models.image_encoder, generated, references)
    folder = Path(cfg.output) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    size = cfg.resolution
    grid = Image.new("RGB", (size * len(references), size * 2), "white")
    for i, (ref, gen) in enumerate(zip(references, generated)):
        grid.paste(ref.resize((size, size)), (i * size, 0))
        grid.paste(gen.resize((size, size)), (i * size, size))
    grid.save(folder / f"step-{trainer.step:07d}.png")
    with (folder / "scores.tsv").open("a") as f:
        f.write(f"{trainer.step}\t{score:.4f}\n")
    return score
