"""The prompter on every pipeline kind users combine IP-Adapter with: the same pixels as diffusers' built-in
IP-Adapter on image-to-image, inpainting, T2I-Adapter and SDXL pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_helpers import ours as _ours
from parity_helpers import theirs as _theirs
from PIL import Image
from tiny_models import make_sd_folder, make_sdxl_folder, tiny_clip_vision

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    base, encoder_folder = make_sd_folder(root)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(4)
    adapter = IPAdapter.for_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "plus",
                                 image_embed_dim=ImageEncoder.from_pretrained(encoder_folder).hidden_dim)  # fmt: skip
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    adapter.save(root / "ip.bin", layout="official")
    return root, base, encoder_folder


def _images():
    reference = Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 20).convert("RGB")
    start = Image.radial_gradient("L").resize((16, 16)).convert("RGB")
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    return reference, start, Image.fromarray(mask)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_same_pixels_as_diffusers_on_other_pipeline_kinds(sd, kind, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    root, base, encoder_folder = sd
    reference, start, mask = _images()
    extra, call = {}, {}
    if kind == "img2img":
        cls, call = StableDiffusionImg2ImgPipeline, {"image": start, "strength": 0.7}
    else:
        cls, call = StableDiffusionInpaintPipeline, {"image": start, "mask_image": mask, "strength": 0.9}
    theirs = _theirs(cls, base, encoder_folder, root, "ip.bin", **extra)
    theirs.set_ip_adapter_scale(0.7)
    common = {"prompt": "a red shape", "num_inference_steps": 4, "output_type": "np"}
    expected = theirs(ip_adapter_image=reference, generator=torch.Generator("cpu").manual_seed(3), **common,
                      **call).images  # fmt: skip
    ours = _ours(cls, base, **extra)
    prompter = ImagePrompter(ours, IPAdapter.from_file(root / "ip.bin"), ImageEncoder.from_pretrained(encoder_folder))
    call = {("pipeline_image" if k == "image" else k): v for k, v in call.items()}
    found = prompter(image=reference, scale=0.7, generator=torch.Generator("cpu").manual_seed(3), **common, **call).images
    prompter.detach()
    assert abs(expected - found).max() <= 1e-5
    plain = ours(generator=torch.Generator("cpu").manual_seed(3), **common,
                 **{("image" if k == "pipeline_image" else k): v for k, v in call.items()}).images  # fmt: skip
    assert abs(plain - found).max() > 1e-3


def test_t2i_adapter_pipeline_runs_with_the_image_prompt_beside_it(sd, tmp_path):
    """diffusers' T2I-Adapter pipeline has no built-in IP-Adapter; ours attaches to its UNet like to any other."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    root, base, encoder_folder = sd
    reference, start, _ = _images()
    torch.manual_seed(0)
    t2i = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2, adapter_type="full_adapter")
    with torch.no_grad():
        for p in t2i.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = _ours(StableDiffusionAdapterPipeline, base, adapter=t2i)
    common = {"prompt": "a red shape", "num_inference_steps": 3, "output_type": "np"}
    plain = pipe(image=start, generator=torch.Generator("cpu").manual_seed(1), **common).images
    no_structure = pipe(image=start, adapter_conditioning_scale=0.0, generator=torch.Generator("cpu").manual_seed(1),
                        **common).images  # fmt: skip
    assert abs(plain - no_structure).max() > 1e-3  # the T2I-Adapter acts
    prompter = ImagePrompter(pipe, IPAdapter.from_file(root / "ip.bin"), ImageEncoder.from_pretrained(encoder_folder))
    off = prompter(image=reference, scale=0.0, pipeline_image=start, generator=torch.Generator("cpu").manual_seed(1),
                   **common).images  # fmt: skip
    on = prompter(image=reference, scale=0.7, pipeline_image=start, generator=torch.Generator("cpu").manual_seed(1),
                  **common).images  # fmt: skip
    prompter.detach()
    assert abs(off - plain).max() <= 1e-6 and abs(on - plain).max() > 1e-3


def test_same_pixels_as_diffusers_on_sdxl(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    base = make_sdxl_folder(tmp_path)
    tiny_clip_vision(image_size=28).save_pretrained(tmp_path / "image_encoder")
    encoder = ImageEncoder.from_pretrained(tmp_path / "image_encoder")
    ours = _ours(StableDiffusionXLPipeline, base)
    torch.manual_seed(5)
    adapter = IPAdapter.for_unet(ours.unet, "base", image_embed_dim=encoder.pooled_dim)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    adapter.save(tmp_path / "ip.bin", layout="official")
    theirs = _theirs(StableDiffusionXLPipeline, base, tmp_path / "image_encoder", tmp_path, "ip.bin")
    reference, _, _ = _images()
    common = {"prompt": "a red shape", "num_inference_steps": 3, "output_type": "np", "height": 16, "width": 16}
    theirs.set_ip_adapter_scale(0.8)
    expected = theirs(ip_adapter_image=reference, generator=torch.Generator("cpu").manual_seed(2), **common).images
    prompter = ImagePrompter(ours, IPAdapter.from_file(tmp_path / "ip.bin"), encoder)
    found = prompter(image=reference, scale=0.8, generator=torch.Generator("cpu").manual_seed(2), **common).images
    prompter.detach()
    assert abs(expected - found).max() <= 1e-5
    # the CLI without --negative-prompt: what diffusers gives without negative_prompt (SDXL: zero embeddings, since
    # the pipeline's force_zeros_for_empty_prompt; not the encoded empty prompt)
    from PIL import Image

    from ipadapter.cli import main

    reference.save(tmp_path / "ref.png")
    assert main(["generate", "--image", str(tmp_path / "ref.png"), "--prompt", "a red shape", "--scale", "0.8",
                 "--steps", "3", "--seed", "2", "--width", "16", "--height", "16", "--base", str(base), "--adapter",
                 str(tmp_path / "ip.bin"), "--image-encoder", str(tmp_path / "image_encoder"), "--out",
                 str(tmp_path / "out")]) == 0  # fmt: skip
    cli = np.asarray(Image.open(tmp_path / "out" / "000002-000.png")).astype(int)
    saved = _theirs(StableDiffusionXLPipeline, base, tmp_path / "image_encoder", tmp_path, "ip.bin")
    saved.scheduler = StableDiffusionXLPipeline.from_pretrained(base).scheduler  # the folder's own, as the CLI uses
    saved.set_ip_adapter_scale(0.8)
    run = {**common, "ip_adapter_image": reference}
    diffusers = saved(generator=torch.Generator("cpu").manual_seed(2), **run).images[0]
    empty = saved(generator=torch.Generator("cpu").manual_seed(2), negative_prompt="", **run).images[0]
    assert abs(cli - (diffusers * 255).round()).max() <= 1
    assert abs(cli - (empty * 255).round()).max() > 10  # the encoded empty prompt would be another image


def test_loading_asks_diffusers_and_transformers_for_the_dtype_without_deprecated_keywords(sd):
    """diffusers (since mid-2026) and transformers deprecate `torch_dtype`: our loaders must not make every run print
    their FutureWarning, in float32 or half precision."""
    import warnings

    from ipadapter.sources import load_pipeline
    from ipadapter.training.models import load_frozen_models

    base = sd[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline(str(base), dtype=torch.bfloat16)
        load_frozen_models(str(base), "", False, torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    assert not [w for w in caught if "torch_dtype" in str(w.message)], [str(w.message) for w in caught]
