"""SD1.5 ControlNet image-to-image and inpainting through the prompter: the same pixels as diffusers' built-in
IP-Adapter (the ControlNet sees the text only on both sides)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_helpers import ours, refs, run, sd_folders, theirs
from PIL import Image

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folders(tmp_path_factory.mktemp("controlnet"), {"plus": 2})


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_controlnet_img2img_and_inpaint_match_diffusers(sd, kind):
    from diffusers import (ControlNetModel, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetInpaintPipeline, UNet2DConditionModel)

    root, base, encoder_folder = sd
    a, _, _ = refs()
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                                           conditioning_embedding_out_channels=(8, 16))  # fmt: skip
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    square = np.zeros((16, 16), np.uint8)
    square[4:12, 4:12] = 255
    call = {"image": Image.radial_gradient("L").resize((16, 16)).convert("RGB"),
            "control_image": Image.fromarray(np.stack([square] * 3, -1)), "controlnet_conditioning_scale": 0.8}
    if kind == "img2img":
        cls, call = StableDiffusionControlNetImg2ImgPipeline, {**call, "strength": 0.7}
    else:
        cls, call = StableDiffusionControlNetInpaintPipeline, {**call, "mask_image": Image.fromarray(square),
                                                               "strength": 0.9}  # fmt: skip
    pipe = theirs(cls, base, encoder_folder, root, "plus.bin", controlnet=controlnet)
    pipe.set_ip_adapter_scale(0.7)
    expected = run(pipe, ip_adapter_image=a, num_inference_steps=4, **call)
    prompter = ImagePrompter(ours(cls, base, controlnet=controlnet), IPAdapter.from_file(root / "plus.bin"),
                             ImageEncoder.from_pretrained(encoder_folder))  # fmt: skip
    try:
        mine = {("pipeline_image" if k == "image" else k): v for k, v in call.items()}
        found = run(prompter, image=a, scale=0.7, num_inference_steps=4, **mine)
    finally:
        prompter.detach()
    assert abs(expected - found).max() <= 1e-5
