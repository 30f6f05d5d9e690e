"""Validation during training: generate from fixed references, score CLIP image similarity, save a grid."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from PIL import Image

from .data import Record, open_image, read_face_id


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
    """Image-only generations (scale 1, empty text) from each validation reference (with its face embedding for
    FaceID variants), saved as a grid; returns CLIP-I, or None where the variant has no image encoder to score with
    (plain FaceID, FaceID-Portrait: the grid alone) or no record could be read."""
    from ..prompter import ImagePrompter

    models, cfg = trainer.models, trainer.cfg
    pairs = []  # (reference image, its face embedding or None)
    for record in records:
        image = open_image(record)
        if image is None:
            continue
        face = None
        if trainer.variant.id_embed_dim:
            try:
                face = read_face_id(record)
            except ValueError:  # an unreadable embedding: the record is skipped, as in training
                continue
        pairs.append((image, face))
    if not pairs:
        return None
    references = [image for image, _ in pairs]
    encoder = models.image_encoder
    adapter = trainer.accelerator.unwrap_model(trainer.module).adapter
    adapter.eval()
    pipe = build_pipeline(models)
    pipe.set_progress_bar_config(disable=True)
    prompter = ImagePrompter(pipe, adapter, encoder)
    # With mixed precision the frozen encoders are half precision and the UNet float32, as in training, where
    # Accelerate's autocast joins them: generate under the same autocast.
    dtype = trainer._weight_dtype()
    amp = torch.autocast(trainer.accelerator.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    # diffusers' SD / SDXL pipelines take sizes that are multiples of 8 only; training takes any --resolution (the VAE
    # and UNet handle the rest), so a run at e.g. 500 px generates at 496 px instead of failing at its first validation
    gen_size = max(8, cfg.resolution // 8 * 8)
    generated = []
    try:
        for i, (reference, face) in enumerate(pairs):
            g = torch.Generator("cpu").manual_seed((cfg.seed + i) % 2**64)
            with amp:
                out = prompter(image=reference if encoder is not None else None, face_id=face, prompt="", scale=1.0,
                               num_inference_steps=cfg.validation_steps, height=gen_size, width=gen_size,
                               generator=g)  # fmt: skip
            generated.append(out.images[0])
    finally:  # (the adapter stays attached: it is the training UNet's)
        adapter.train()
    score = clip_image_similarity(encoder, generated, references) if encoder is not None else None
    folder = Path(cfg.output) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    size = cfg.resolution
    grid = Image.new("RGB", (size * len(references), size * 2), "white")
    for i, (ref, gen) in enumerate(zip(references, generated)):
        grid.paste(ref.resize((size, size)), (i * size, 0))
        grid.paste(gen.resize((size, size)), (i * size, size))
    grid.save(folder / f"step-{trainer.step:07d}.png")
    if score is not None:
        with (folder / "scores.tsv").open("a") as f:
            f.write(f"{trainer.step}\t{score:.4f}\n")
    return score
