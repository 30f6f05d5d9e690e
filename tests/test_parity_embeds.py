"""Precomputed embeddings: diffusers' `ip_adapter_image_embeds` (negative half first under CFG, 3D pooled or 4D
penultimate, several images per adapter) against our `image=` / `negative_image=` features: the same pixels."""

from __future__ import annotations

import pytest
import torch
from parity_helpers import ours, refs, run, sd_folders, theirs

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folders(tmp_path_factory.mktemp("embeds"))


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_precomputed_embeds_match_diffusers(sd, variant):
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    a, b, c = refs()
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    pipe = theirs(StableDiffusionPipeline, base, encoder_folder, root, f"{variant}.bin")
    pipe.set_ip_adapter_scale(0.8)
    prompter = ImagePrompter(ours(StableDiffusionPipeline, base), IPAdapter.from_file(root / f"{variant}.bin"), encoder)
    feature = "pooled" if variant == "base" else "penultimate"
    positive, negative = encoder.encode([a, b], feature), encoder.encode([c, c], feature)  # a custom negative
    try:
        expected = run(pipe, ip_adapter_image_embeds=[torch.stack([negative, positive])], num_images_per_prompt=2)
        found = run(prompter, image=list(positive), negative_image=list(negative), scale=0.8, num_images_per_prompt=2)
        assert abs(expected - found).max() <= 1e-5
        saved = pipe.prepare_ip_adapter_image_embeds([[a, b]], None, "cpu", 1, True)  # what users torch.save
        assert abs(run(pipe, ip_adapter_image_embeds=saved) - run(prompter, image=list(positive), scale=0.8)).max() <= 1e-5
        expected = run(pipe, ip_adapter_image_embeds=[positive[None]], guidance_scale=1.0)  # no negative half
        assert abs(expected - run(prompter, image=list(positive), scale=0.8, guidance_scale=1.0)).max() <= 1e-5
    finally:
        prompter.detach()
