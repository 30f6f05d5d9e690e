"""Our adapter and diffusers' built-in IP-Adapter, loaded from the same official-layout file, predict the same noise."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_unet, unet_inputs

from ipadapter import IPAdapter

POOLED, HIDDEN, TOKENS = 40, 48, 5  # tiny ViT-H-shaped encoder: 40-d image_embeds, 48-d hidden, 4 patches + CLS

# variant -> (checkpoint file name, what the projection reads)
VARIANTS = {
    "base": ("ip-adapter_tiny.safetensors", "pooled"),
    "plus": ("ip-adapter-plus_tiny.bin", "penultimate"),
    "full": ("ip-adapter-full_tiny.bin", "penultimate"),
    "faceid": ("ip-adapter-faceid_tiny.bin", "faceid"),
    "faceid_plus": ("ip-adapter-faceid-plus_tiny.bin", "faceid_plus"),
    "faceid_plusv2": ("ip-adapter-faceid-plusv2_tiny.bin", "faceid_plus"),
    "faceid_portrait": ("ip-adapter-faceid-portrait_tiny.bin", "faceid_portrait"),
}


def _pipeline(unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if unet.config.addition_embed_type == "text_time":
        return StableDiffusionXLPipeline(
            vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet,
            scheduler=DDIMScheduler(), image_encoder=None, feature_extractor=None,
        )
    return StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(), safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def _features(kind: str, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    if kind == "pooled":
        return {"image": torch.randn(batch, POOLED, generator=g)}
    if kind == "penultimate":
        return {"image": torch.randn(batch, TOKENS, HIDDEN, generator=g)}
    if kind == "faceid":
        return {"face_id": torch.randn(batch, 512, generator=g)}
    if kind == "faceid_portrait":
        return {"face_id": torch.randn(batch, 3, 512, generator=g)}  # three faces per sample
    return {"face_id": torch.randn(batch, 512, generator=g), "image": torch.randn(batch, TOKENS, HIDDEN, generator=g)}


def _diffusers_embeds(kind: str, feats: dict[str, torch.Tensor], pipe) -> list[torch.Tensor]:
    """Our features in diffusers' per-adapter layout (batch, num_images, ...)."""
    if kind in ("pooled", "penultimate"):
        return [feats["image"][:, None]]
    if kind == "faceid_portrait":
        return [feats["face_id"]]  # (B, faces, 512): diffusers concatenates the faces' tokens
    if kind == "faceid_plus":
        proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        proj.clip_embeds = feats["image"][:, None]  # (B, 1, N, D), set by hand as diffusers documents
    return [feats["face_id"][:, None]]


def _random_adapter(unet, variant: str) -> IPAdapter:
    embed_dim = POOLED if variant == "base" else HIDDEN
    adapter = IPAdapter.for_unet(unet, variant, image_embed_dim=embed_dim)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # LayerNorms start at identity and LoRA `up` at zero: perturb everything
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return adapter


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_noise_prediction_matches_diffusers(tmp_path, family, variant):
    filename, kind = VARIANTS[variant]
    unet = tiny_unet(family)
    reference = copy.deepcopy(unet)
    _random_adapter(unet, variant).save(tmp_path / filename, layout="official")

    pipe = _pipeline(reference)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=filename, image_encoder_folder=None)
    if variant == "faceid_plusv2":
        pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut = True

    ours = IPAdapter.from_file(tmp_path / filename).attach(unet)
    assert ours.config.shortcut == (variant == "faceid_plusv2")

    g = torch.Generator().manual_seed(3)
    inputs = unet_inputs(unet, batch=2)  # a CFG batch: row 0 unconditional, row 1 conditional
    feats = _features(kind, 2, g)
    embeds = _diffusers_embeds(kind, feats, pipe)
    with torch.no_grad():
        tokens = ours.project(**feats)
        ours.set_tokens(tokens[1:], uncond=tokens[:1])
        for scale in (0.0, 0.5, 1.0):
            pipe.set_ip_adapter_scale(scale)
            ours.set_scale(scale)
            added = dict(inputs.get("added_cond_kwargs", {}), image_embeds=embeds)
            expected = reference(**{**inputs, "added_cond_kwargs": added}).sample
            found = unet(**inputs).sample
            assert (expected - found).abs().max().item() <= 1e-5, f"scale {scale}"
        if variant == "faceid_plusv2":  # the face-structure weight: our s_scale is diffusers' shortcut_scale
            pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut_scale = 0.3
            tokens = ours.project(**feats, s_scale=0.3)
            ours.set_tokens(tokens[1:], uncond=tokens[:1])
            added = dict(inputs.get("added_cond_kwargs", {}), image_embeds=embeds)
            expected = reference(**{**inputs, "added_cond_kwargs": added}).sample
            structure = unet(**inputs).sample
            assert (expected - structure).abs().max().item() <= 1e-5 < (structure - found).abs().max().item()
        elif variant == "faceid_plus":  # v1 has no shortcut: a structure weight would be silently meaningless
            with pytest.raises(ValueError, match="s_scale weighs the face-structure branch of FaceID-PlusV2"):
                ours.project(**feats, s_scale=0.3)
        # The adapter really acts: at scale 1 the prediction differs from the plain UNet.
        ours.detach()
        plain = unet(**inputs).sample
        assert (plain - found).abs().max().item() > 1e-3
