"""FaceID (with its LoRA) and FaceID-PlusV2 (clip_embeds, shortcut, shortcut_scale) on a whole pipeline with
num_images_per_prompt > 1: the same pixels as diffusers' built-in IP-Adapter (the UNet-level test has batch 2 only)."""

from __future__ import annotations

import pytest
import torch
from parity_helpers import ours, refs, run, sd_folders, theirs

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folders(tmp_path_factory.mktemp("faceid"), {"faceid": 7, "faceid_plusv2": 8})


def test_faceid_pipelines_match_diffusers(sd):
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    a, _, _ = refs()
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    face = torch.randn(512, generator=torch.Generator().manual_seed(0))
    embeds = [torch.stack([torch.zeros(1, 512), face[None]])]  # (2 = [negative; positive], 1 image, 512)
    mine = ours(StableDiffusionPipeline, base)
    pipe = theirs(StableDiffusionPipeline, base, encoder_folder, root, "faceid.bin")  # its LoRA through PEFT
    pipe.set_ip_adapter_scale(0.7)
    expected = run(pipe, ip_adapter_image_embeds=embeds, num_images_per_prompt=2)
    prompter = ImagePrompter(mine, IPAdapter.from_file(root / "faceid.bin"), None)
    try:
        assert abs(expected - run(prompter, face_id=face, scale=0.7, num_images_per_prompt=2)).max() <= 1e-5
    finally:
        prompter.detach()
    pipe = theirs(StableDiffusionPipeline, base, encoder_folder, root, "faceid_plusv2.bin")
    pipe.set_ip_adapter_scale(0.7)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = pipe.prepare_ip_adapter_image_embeds([a], None, "cpu", 2, True)[0]  # as diffusers documents
    projection.shortcut = True
    prompter = ImagePrompter(mine, IPAdapter.from_file(root / "faceid_plusv2.bin"), encoder)
    try:
        for s_scale in (1.0, 0.4):
            projection.shortcut_scale = s_scale
            expected = run(pipe, ip_adapter_image_embeds=embeds, num_images_per_prompt=2)
            found = run(prompter, image=a, face_id=face, scale=0.7, s_scale=s_scale, num_images_per_prompt=2)
            assert abs(expected - found).max() <= 1e-5, s_scale
    finally:
        prompter.detach()
