"""Batches of prompts with num_images_per_prompt > 1, negative prompts, and guidance off: the same pixels as
diffusers' built-in IP-Adapter (one reference set for the whole batch, diffusers' only form)."""

from __future__ import annotations

import pytest
from parity_helpers import ours, refs, run, sd_folders, theirs

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folders(tmp_path_factory.mktemp("batches"), {"plus": 2})


def test_prompt_batches_and_guidance_off_match_diffusers(sd):
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    a, b, _ = refs()
    pipe = theirs(StableDiffusionPipeline, base, encoder_folder, root, "plus.bin")
    pipe.set_ip_adapter_scale(0.6)
    prompter = ImagePrompter(ours(StableDiffusionPipeline, base), IPAdapter.from_file(root / "plus.bin"),
                             ImageEncoder.from_pretrained(encoder_folder))  # fmt: skip
    prompts = {"prompt": ["a red shape", "a blue square"], "num_images_per_prompt": 2}
    try:
        assert abs(run(pipe, ip_adapter_image=a, **prompts) - run(prompter, image=a, scale=0.6, **prompts)).max() <= 1e-5
        negatives = {**prompts, "negative_prompt": ["ugly", "dark"]}
        expected = run(pipe, ip_adapter_image=[[a, b]], **negatives)
        found = run(prompter, image=[[a, b], [a, b]], scale=0.6, **negatives)  # ours: one list per prompt
        assert abs(expected - found).max() <= 1e-5
        for guidance in (1.0, 0.0):  # no classifier-free guidance: no unconditional image prompt
            expected = run(pipe, ip_adapter_image=a, guidance_scale=guidance, num_images_per_prompt=2)
            found = run(prompter, image=a, scale=0.6, guidance_scale=guidance, num_images_per_prompt=2)
            assert abs(expected - found).max() <= 1e-5, guidance
    finally:
        prompter.detach()
