"""Masks with diffusers' own forms (one mask per adapter, the legacy tensor form, per-image scale lists, block dicts
holding per-image lists) against ours (mask=, regions= with weights=): the same pixels."""

from __future__ import annotations

import pytest
from parity_helpers import half_masks, ours, refs, run, sd_folders, theirs

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folders(tmp_path_factory.mktemp("masks"), {"plus": 2})


def test_masks_and_per_image_scale_lists_match_diffusers(sd):
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    a, b, _ = refs()
    masks = half_masks()  # (2, 1, 16, 16)
    pipe = theirs(StableDiffusionPipeline, base, encoder_folder, root, "plus.bin")
    prompter = ImagePrompter(ours(StableDiffusionPipeline, base), IPAdapter.from_file(root / "plus.bin"),
                             ImageEncoder.from_pretrained(encoder_folder))  # fmt: skip
    two = {"cross_attention_kwargs": {"ip_adapter_masks": [masks.reshape(1, 2, 16, 16)]}}
    cases = [  # (diffusers' scale, its call, our call)
        (0.8, {"ip_adapter_image": a, "cross_attention_kwargs": {"ip_adapter_masks": [masks[:1]]}},
         {"image": a, "scale": 0.8, "mask": masks[0, 0]}),
        (0.8, {"ip_adapter_image": a, "cross_attention_kwargs": {"ip_adapter_masks": masks[:1]}},  # legacy tensor
         {"image": a, "scale": 0.8, "mask": masks[0, 0]}),
        ([[0.7, 0.3]], {"ip_adapter_image": [[a, b]], **two},
         {"image": [a, b], "scale": 1.0, "regions": [masks[0, 0], masks[1, 0]], "weights": [0.7, 0.3]}),
        ({"down": {"block_1": [[0.7, 0.3], [0.7, 0.3]]}, "up": {"block_2": [[0.7, 0.3]]}},
         {"ip_adapter_image": [[a, b]], **two},
         {"image": [a, b], "scale": {"down": {"block_1": 1.0}, "up": {"block_2": 1.0}},
          "regions": [masks[0, 0], masks[1, 0]], "weights": [0.7, 0.3]}),
    ]  # fmt: skip
    try:
        for scale, call, mine in cases:
            pipe.set_ip_adapter_scale(scale)
            expected = run(pipe, **call)
            found = run(prompter, **mine)
            assert abs(expected - found).max() <= 1e-5, scale
    finally:
        prompter.detach()
