"""Several adapters at once (diffusers: load_ip_adapter(weight_name=[...]), set_ip_adapter_scale([...]), masks per
adapter): the same pixels as diffusers' built-in IP-Adapter."""

from __future__ import annotations

import pytest
from parity_helpers import half_masks, ours, refs, run, sd_folders, theirs

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompt, ImagePrompter

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folders(tmp_path_factory.mktemp("several"))


def test_two_adapters_with_scales_block_dicts_and_masks_match_diffusers(sd):
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    a, b, c = refs()
    masks = half_masks()
    pipe = theirs(StableDiffusionPipeline, base, encoder_folder, root, ["base.bin", "plus.bin"])
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    prompter = ImagePrompter(ours(StableDiffusionPipeline, base),
                             [IPAdapter.from_file(root / "base.bin"), IPAdapter.from_file(root / "plus.bin")],
                             [encoder, encoder])  # fmt: skip
    blocks = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_2": [0.5, 0.0, 1.0]}}
    cases = [  # (diffusers' scales, its call, our ImagePrompts)
        ([0.7, 0.3], {"ip_adapter_image": [a, [b, c]]},
         [ImagePrompt(image=a, scale=0.7), ImagePrompt(image=[b, c], scale=0.3)]),
        ([0.6, blocks], {"ip_adapter_image": [a, [b, c]]},
         [ImagePrompt(image=a, scale=0.6), ImagePrompt(image=[b, c], scale=blocks)]),
        ([0.7, 0.5], {"ip_adapter_image": [a, b], "cross_attention_kwargs": {"ip_adapter_masks": [masks[:1], masks[1:]]}},
         [ImagePrompt(image=a, scale=0.7, mask=masks[0, 0]), ImagePrompt(image=b, scale=0.5, mask=masks[1, 0])]),
        ([0.7, 0.5], {"ip_adapter_image": [a, b], "cross_attention_kwargs": {"ip_adapter_masks": [masks[:1], None]}},
         [ImagePrompt(image=a, scale=0.7, mask=masks[0, 0]), ImagePrompt(image=b, scale=0.5)]),
    ]  # fmt: skip
    try:
        for scales, call, prompts in cases:
            pipe.set_ip_adapter_scale(scales)
            expected = run(pipe, **call)
            found = run(prompter, prompts=prompts)
            assert abs(expected - found).max() <= 1e-5, (scales, list(call))
    finally:
        prompter.detach()
