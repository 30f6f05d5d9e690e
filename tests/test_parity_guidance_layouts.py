"""Pipelines that stack their UNet batch other than [uncond, cond]: perturbed-attention guidance (diffusers' PAG
pipelines: [uncond, cond, cond]), InstructPix2Pix ([cond, uncond, uncond]) and guidance switched off by a callback
during the generation (diffusers' "dynamic CFG": the batch halves). Each chunk gets its own image tokens, and the
pixels equal diffusers' built-in IP-Adapter on the same pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from parity_helpers import ours, refs, run, sd_folders, theirs
from PIL import Image

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter
from ipadapter.state import BatchLayout, rows_for

pytestmark = pytest.mark.usefixtures("sdpa_path")  # the attention path of real SD1.5 / SDXL layers


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folders(tmp_path_factory.mktemp("layouts"), {"plus": 2})


def _prompter(cls, root, base, encoder_folder, **extra) -> ImagePrompter:
    return ImagePrompter(ours(cls, base, **extra), IPAdapter.from_file(root / "plus.bin"),
                         ImageEncoder.from_pretrained(encoder_folder))  # fmt: skip


def test_layouts_trace_with_a_dynamic_batch_and_a_new_layout_takes_effect():
    """torch.compile traces the rows of a layout for a batch size it marks dynamic (divmod on a SymInt broke the
    graph: every generation recompiled under dynamic CFG), and setting a layout drops the per-layer plans built for
    the previous one (the next call of the same batch size reused its rows)."""
    from ipadapter.state import PromptState

    cond, uncond = torch.ones(1, 2, 3), -torch.ones(1, 2, 3)
    layout = BatchLayout(images=1, chunks={1: "c", 2: "uc", 3: "ucc"})
    rows = torch.compile(lambda n: rows_for(cond, uncond, n, cfg=True, layout=layout), backend="eager",
                         dynamic=True, fullgraph=True)  # fmt: skip
    assert rows(3)[:, 0, 0].tolist() == [-1, 1, 1] and rows(2)[:, 0, 0].tolist() == [-1, 1]
    state = PromptState(num_layers=1)
    state.plans[0] = "built for the previous layout"
    state.layout = layout
    assert not state.plans


def test_layout_gives_each_chunk_its_rows():
    cond, uncond = torch.tensor([[1.0], [2.0]]), torch.tensor([[-1.0], [-2.0]])  # two prompts
    layout = BatchLayout(images=4, chunks={1: "c", 3: "cuu"})  # two images per prompt
    assert rows_for(cond, uncond, 12, cfg=True, layout=layout).flatten().tolist() == \
        [1, 1, 2, 2, -1, -1, -2, -2, -1, -1, -2, -2]  # fmt: skip
    assert rows_for(cond, uncond, 4, cfg=True, layout=layout).flatten().tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"UNet batch of 8 rows .* expected 4 \(conditional\), 12 \(conditional\+"):
        rows_for(cond, uncond, 8, cfg=True, layout=layout)


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_perturbed_attention_guidance_matches_diffusers(sd, guidance):
    from diffusers import StableDiffusionPAGPipeline

    root, base, encoder_folder = sd
    a, _, _ = refs()
    call = {"guidance_scale": guidance, "pag_scale": 2.0, "num_images_per_prompt": 2,
            "prompt": ["a red shape", "a blue shape"], "negative_prompt": ["blurry", ""]}  # fmt: skip
    pipe = theirs(StableDiffusionPAGPipeline, base, encoder_folder, root, "plus.bin", pag_applied_layers=["down"])
    pipe.set_ip_adapter_scale(0.8)
    expected = run(pipe, ip_adapter_image=a, **call)
    plain = run(pipe, ip_adapter_image=a, **{**call, "pag_scale": 0.0})
    prompter = _prompter(StableDiffusionPAGPipeline, root, base, encoder_folder, pag_applied_layers=["down"])
    try:
        found = run(prompter, image=a, scale=0.8, **call)
        # no applied layers: diffusers' pipeline runs without PAG's chunk whatever pag_scale says
        pipe.set_pag_applied_layers([])
        prompter.pipe.set_pag_applied_layers([])
        expected_off, found_off = run(pipe, ip_adapter_image=a, **call), run(prompter, image=a, scale=0.8, **call)
    finally:
        prompter.detach()
    assert abs(expected - plain).max() > 1e-3  # the perturbed chunk changes the images
    assert abs(expected - found).max() <= 1e-5
    assert abs(expected_off - found_off).max() <= 1e-5


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_perturbed_attention_guidance_keeps_each_prompts_reference(sd, guidance):
    """Two prompts with their own references in one batch give what each gives alone (diffusers' built-in
    IP-Adapter gives every prompt the same references, so this is checked against our own single-prompt runs)."""
    from diffusers import StableDiffusionPAGPipeline

    root, base, encoder_folder = sd
    a, b, _ = refs()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    call = {"guidance_scale": guidance, "pag_scale": 2.0, "num_images_per_prompt": 2}
    prompter = _prompter(StableDiffusionPAGPipeline, root, base, encoder_folder, pag_applied_layers=["down"])
    try:
        both = run(prompter, image=[a, b], prompt=["a red shape", "a blue shape"], latents=latents, **call)
        alone = [run(prompter, image=x, prompt=p, latents=latents[i : i + 2], **call)
                 for i, x, p in [(0, a, "a red shape"), (2, b, "a blue shape")]]  # fmt: skip
    finally:
        prompter.detach()
    assert abs(alone[0] - alone[1]).max() > 1e-3
    assert abs(both - np.concatenate(alone)).max() <= 1e-5


@pytest.mark.parametrize("image_guidance", [1.5, 0.5])  # below 1 the pipeline runs one chunk (no guidance)
def test_instruct_pix2pix_matches_diffusers(sd, tmp_path, image_guidance):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline, UNet2DConditionModel

    root, base, encoder_folder = sd
    parts = StableDiffusionPipeline.from_pretrained(base).components
    torch.manual_seed(4)  # InstructPix2Pix's UNet reads the latents and the input image's latents: 8 channels
    parts["unet"] = UNet2DConditionModel.from_config({**parts["unet"].config, "in_channels": 8})
    StableDiffusionInstructPix2PixPipeline(**parts).save_pretrained(tmp_path / "pix2pix")
    folder = str(tmp_path / "pix2pix")
    a, _, c = refs()
    call = {"image": c.resize((16, 16)), "image_guidance_scale": image_guidance, "guidance_scale": 6.0,
            "negative_prompt": "blurry"}  # fmt: skip
    pipe = theirs(StableDiffusionInstructPix2PixPipeline, folder, encoder_folder, root, "plus.bin")
    pipe.set_ip_adapter_scale(0.9)
    expected = run(pipe, ip_adapter_image=a, **call)
    prompter = _prompter(StableDiffusionInstructPix2PixPipeline, root, folder, encoder_folder)
    try:
        found = run(prompter, image=a, scale=0.9, **{("pipeline_image" if k == "image" else k): v
                                                      for k, v in call.items()})  # fmt: skip
    finally:
        prompter.detach()
    assert abs(expected - found).max() <= 1e-5


def test_perturbed_attention_guidance_keeps_a_faceid_lora(tmp_path):
    """PAG swaps its layers' self-attention processors during the call; a FaceID adapter's LoRA sits on the Linear
    layers (as diffusers' PEFT LoRA does), so it acts there too: the pixels of diffusers' FaceID under PAG (a LoRA
    kept by our processors was lost on those layers: 0.2 off here)."""
    from diffusers import StableDiffusionPAGPipeline

    root, base, encoder_folder = sd_folders(tmp_path, {"faceid": 3})
    face = torch.randn(512, generator=torch.Generator().manual_seed(0))
    call = {"pag_scale": 2.0, "num_images_per_prompt": 2}
    pipe = theirs(StableDiffusionPAGPipeline, base, encoder_folder, root, "faceid.bin", pag_applied_layers=["down"])
    pipe.set_ip_adapter_scale(0.7)
    expected = run(pipe, ip_adapter_image_embeds=[torch.stack([torch.zeros(1, 512), face[None]])], **call)
    prompter = ImagePrompter(ours(StableDiffusionPAGPipeline, base, pag_applied_layers=["down"]),
                             IPAdapter.from_file(root / "faceid.bin"))  # fmt: skip
    try:
        found = run(prompter, face_id=face, scale=0.7, **call)
        lora_off = prompter.adapter.lora
        with torch.no_grad():
            for p in lora_off.parameters():
                p.zero_()
        without_lora = run(prompter, face_id=face, scale=0.7, **call)
    finally:
        prompter.detach()
    assert abs(expected - without_lora).max() > 1e-3  # the LoRA changes these images
    assert abs(expected - found).max() <= 1e-5


def _guidance_off_after(step: int):
    """diffusers' documented dynamic-CFG callback: from `step` on, guidance off and the prompt's positive half."""

    def callback(pipe, i, t, tensors):
        if i == step:
            pipe._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
        return tensors

    return callback


def _positive_image_half(module, args, kwargs):
    """diffusers' IP-Adapter keeps its [uncond, cond] image embeddings when a callback halves the batch (and gives
    other images, 3e-4 off on this model): given the positive half, as the halved prompt is."""
    sample = args[0] if args else kwargs["sample"]
    embeds = kwargs["added_cond_kwargs"]["image_embeds"]
    if embeds[0].shape[0] != sample.shape[0]:
        kwargs["added_cond_kwargs"] = {**kwargs["added_cond_kwargs"], "image_embeds": [e.chunk(2)[-1] for e in embeds]}
    return args, kwargs


def test_guidance_switched_off_by_a_callback_matches_diffusers(sd):
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    a, _, _ = refs()
    call = {"prompt": ["a red shape", "a green shape"], "num_images_per_prompt": 2, "num_inference_steps": 4,
            "callback_on_step_end": _guidance_off_after(1), "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    pipe = theirs(StableDiffusionPipeline, base, encoder_folder, root, "plus.bin")
    pipe.set_ip_adapter_scale(0.8)
    hook = pipe.unet.register_forward_pre_hook(_positive_image_half, with_kwargs=True)
    try:
        expected = run(pipe, ip_adapter_image=a, **call)
    finally:
        hook.remove()
    full = run(pipe, ip_adapter_image=a, **{**call, "callback_on_step_end": None})
    prompter = _prompter(StableDiffusionPipeline, root, base, encoder_folder)
    try:
        found = run(prompter, image=a, scale=0.8, **call)
        again = run(prompter, image=a, scale=0.8, **{**call, "callback_on_step_end": None})
    finally:
        prompter.detach()
    assert abs(expected - full).max() > 1e-3  # the callback changed the images
    assert abs(expected - found).max() <= 1e-5
    assert abs(full - again).max() <= 1e-5  # the next call has guidance on again


def test_unknown_batch_layout_names_what_fits(sd):
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    prompter = _prompter(StableDiffusionPipeline, root, base, encoder_folder)

    def three_chunks(module, args, kwargs):  # a pipeline that stacks a third chunk we do not know
        sample = args[0] if args else kwargs["sample"]
        text = kwargs["encoder_hidden_states"]
        kwargs["encoder_hidden_states"] = torch.cat([text, text[:1]])
        return (torch.cat([sample, sample[:1]]), *args[1:]), kwargs

    hook = prompter.pipe.unet.register_forward_pre_hook(three_chunks, with_kwargs=True)
    try:
        expected = r"UNet batch of 3 rows .* expected 1 \(conditional\), 2 \(unconditional\+"
        with pytest.raises(ValueError, match=expected):
            run(prompter, image=Image.new("RGB", (16, 16)))
    finally:
        hook.remove()
        prompter.detach()


def test_a_guidance_embedding_unet_in_a_pipeline_that_still_guides_matches_diffusers(tmp_path):
    """An LCM-distilled UNet (time_cond_proj_dim) switches classifier-free guidance off in StableDiffusionPipeline but
    not in the ControlNet image-to-image pipeline: the prompter follows the batch it gets, not a guess from the UNet
    (it gave the unconditional half the image prompt there: 0.43 off)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, UNet2DConditionModel
    from parity_helpers import save_adapters
    from tiny_models import make_sd_folder, unet_config

    base, encoder_folder = make_sd_folder(tmp_path)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("sd15"), time_cond_proj_dim=8).eval()
    unet.save_pretrained(Path(base) / "unet")
    save_adapters(unet, ImageEncoder.from_pretrained(encoder_folder), tmp_path, {"plus": 2})
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel(**unet_config("sd15")),
                                           conditioning_embedding_out_channels=(8, 16))  # fmt: skip
    square = np.zeros((16, 16), np.uint8)
    square[4:12, 4:12] = 255
    a, _, _ = refs()
    call = {"control_image": Image.fromarray(np.stack([square] * 3, -1)), "strength": 0.7, "guidance_scale": 7.5,
            "num_inference_steps": 4}  # fmt: skip
    init = Image.radial_gradient("L").resize((16, 16)).convert("RGB")
    cls = StableDiffusionControlNetImg2ImgPipeline
    pipe = theirs(cls, base, encoder_folder, tmp_path, "plus.bin", controlnet=controlnet)
    pipe.set_ip_adapter_scale(0.7)
    expected = run(pipe, ip_adapter_image=a, image=init, **call)
    prompter = _prompter(cls, tmp_path, base, encoder_folder, controlnet=controlnet)
    try:
        found = run(prompter, image=a, scale=0.7, pipeline_image=init, **call)
        negative = run(prompter, image=a, scale=0.7, pipeline_image=init, negative_image=init, **call)
    finally:
        prompter.detach()
    assert abs(expected - found).max() <= 1e-5
    assert abs(negative - found).max() > 1e-3  # this pipeline guides: a negative image acts
    # StableDiffusionPipeline gives the same UNet the scale as an input and runs no unconditional batch: a negative
    # image changed nothing there, silently; now refused, as with guidance_scale <= 1
    from diffusers import StableDiffusionPipeline

    prompter = _prompter(StableDiffusionPipeline, tmp_path, base, encoder_folder)
    try:
        with pytest.raises(ValueError, match=r"negative_image sets the unconditional image prompt.* a guidance-"
                                             r"embedding UNet such as an LCM's"):  # fmt: skip
            run(prompter, image=a, negative_image=init, guidance_scale=7.5, num_inference_steps=2)
        assert np.isfinite(run(prompter, image=a, guidance_scale=7.5, num_inference_steps=2)).all()
    finally:
        prompter.detach()


def test_a_misspelt_keyword_is_refused_not_dropped(sd):
    """diffusers' pipelines take **kwargs and ignore what they do not know: `tile_grid=3` or `gudiance_scale=2` went
    to the pipeline and changed nothing."""
    from diffusers import StableDiffusionPipeline

    root, base, encoder_folder = sd
    prompter = _prompter(StableDiffusionPipeline, root, base, encoder_folder)
    try:
        with pytest.raises(ValueError, match=r"unknown argument\(s\) gudiance_scale, tile_grid: neither an ImagePrompt "
                                             r"field nor a parameter of StableDiffusionPipeline"):  # fmt: skip
            run(prompter, image=refs()[0], tile_grid=3, gudiance_scale=2.0)
    finally:
        prompter.detach()
