"""SDXL: InstantStyle block dicts (one adapter, and two adapters with a dict each), Plus, several images without
guidance, image-to-image, inpainting, ControlNet and T2I-Adapter: the same pixels as diffusers' built-in IP-Adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_helpers import ours, refs, run, sdxl_folders, theirs
from PIL import Image

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompt, ImagePrompter

SIZE = {"height": 16, "width": 16}
STYLE = {"up": {"block_0": [0.0, 1.0, 0.0]}}
LAYOUT = {"down": {"block_2": [0.0, 1.0]}}

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return sdxl_folders(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_sdxl_block_dicts_match_diffusers(sdxl, variant):
    from diffusers import StableDiffusionXLPipeline

    root, base, encoder_folder = sdxl
    a, b, _ = refs()
    pipe = theirs(StableDiffusionXLPipeline, base, encoder_folder, root, f"{variant}.bin")
    prompter = ImagePrompter(ours(StableDiffusionXLPipeline, base), IPAdapter.from_file(root / f"{variant}.bin"),
                             ImageEncoder.from_pretrained(encoder_folder))  # fmt: skip
    try:
        for scale in (STYLE, {**LAYOUT, **STYLE}):
            pipe.set_ip_adapter_scale(scale)
            expected = run(pipe, ip_adapter_image=a, num_images_per_prompt=2, **SIZE)
            assert abs(expected - run(prompter, image=a, scale=scale, num_images_per_prompt=2, **SIZE)).max() <= 1e-5
        pipe.set_ip_adapter_scale(0.7)
        expected = run(pipe, ip_adapter_image=[[a, b]], guidance_scale=1.0, **SIZE)
        assert abs(expected - run(prompter, image=[a, b], scale=0.7, guidance_scale=1.0, **SIZE)).max() <= 1e-5
    finally:
        prompter.detach()


def test_sdxl_instantstyle_with_two_adapters_matches_diffusers(sdxl):
    from diffusers import StableDiffusionXLPipeline

    root, base, encoder_folder = sdxl
    a, b, _ = refs()
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    pipe = theirs(StableDiffusionXLPipeline, base, encoder_folder, root, ["base.bin", "plus.bin"])
    pipe.set_ip_adapter_scale([STYLE, LAYOUT])
    prompter = ImagePrompter(ours(StableDiffusionXLPipeline, base),
                             [IPAdapter.from_file(root / "base.bin"), IPAdapter.from_file(root / "plus.bin")],
                             [encoder, encoder])  # fmt: skip
    try:
        found = run(prompter, prompts=[ImagePrompt(image=a, scale=STYLE), ImagePrompt(image=b, scale=LAYOUT)], **SIZE)
        assert abs(run(pipe, ip_adapter_image=[a, b], **SIZE) - found).max() <= 1e-5
    finally:
        prompter.detach()


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet", "t2i_adapter"])
def test_sdxl_pipeline_kinds_match_diffusers(sdxl, kind):
    from diffusers import (ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, UNet2DConditionModel)

    root, base, encoder_folder = sdxl
    a, _, _ = refs()
    start = Image.radial_gradient("L").resize((16, 16)).convert("RGB")
    square = np.zeros((16, 16), np.uint8)
    square[4:12, 4:12] = 255
    extra = {}
    if kind == "img2img":
        cls, call = StableDiffusionXLImg2ImgPipeline, {"image": start, "strength": 0.7}
    elif kind == "inpaint":
        cls, call = StableDiffusionXLInpaintPipeline, {"image": start, "mask_image": Image.fromarray(square),
                                                      "strength": 0.9, **SIZE}  # fmt: skip
    elif kind == "t2i_adapter":
        from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

        torch.manual_seed(0)
        t2i = T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=4,
                         adapter_type="full_adapter_xl")  # fmt: skip
        cls, extra = StableDiffusionXLAdapterPipeline, {"adapter": t2i}
        call = {"image": Image.fromarray(np.stack([square] * 3, -1)), "adapter_conditioning_scale": 0.9, **SIZE}
    else:
        torch.manual_seed(3)
        controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                                               conditioning_embedding_out_channels=(8, 16))  # fmt: skip
        with torch.no_grad():
            for p in controlnet.parameters():
                p.add_(0.05 * torch.randn_like(p))  # zero convolutions would make it a no-op
        cls, extra = StableDiffusionXLControlNetPipeline, {"controlnet": controlnet}
        call = {"image": Image.fromarray(np.stack([square] * 3, -1)), "controlnet_conditioning_scale": 0.8, **SIZE}
    pipe = theirs(cls, base, encoder_folder, root, "plus.bin", **extra)
    pipe.set_ip_adapter_scale(0.7)
    expected = run(pipe, ip_adapter_image=a, num_inference_steps=4, **call)
    prompter = ImagePrompter(ours(cls, base, **extra), IPAdapter.from_file(root / "plus.bin"),
                             ImageEncoder.from_pretrained(encoder_folder))  # fmt: skip
    try:
        mine = {("pipeline_image" if k == "image" else k): v for k, v in call.items()}
        found = run(prompter, image=a, scale=0.7, num_inference_steps=4, **mine)
    finally:
        prompter.detach()
    assert abs(expected - found).max() <= 2e-5  # SDXL's tiny VAE amplifies float rounding: 5e-6 to 1e-5 measured
