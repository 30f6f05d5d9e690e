"""`ipadapter generate`: the same pixels as diffusers for the same seed, parameters in the PNG, early clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_sd_folder

from ipadapter import IPAdapter
from ipadapter.cli import main
from ipadapter.generate import read_parameters


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base, encoder = make_sd_folder(root)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "base", image_embed_dim=40)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save(root / "ip-adapter.safetensors", layout="official")
    Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 20).convert("RGB").save(root / "ref.png")
    return root, base, encoder


def test_seed_gives_the_pixels_diffusers_gives(setup, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root, base, encoder = setup
    args = ["generate", "--image", str(root / "ref.png"), "--prompt", "a red shape", "--scale", "0.7", "--steps", "3",
            "--seed", "5", "--num-images", "2", "--base", base, "--adapter", str(root / "ip-adapter.safetensors"),
            "--image-encoder", encoder, "--out", str(tmp_path)]
    assert main(args) == 0
    ours = [np.asarray(Image.open(tmp_path / f"000005-00{i}.png")) for i in range(2)]
    pipe = StableDiffusionPipeline.from_pretrained(
        base, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
    )
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    theirs = pipe(prompt="a red shape", ip_adapter_image=Image.open(root / "ref.png"), num_inference_steps=3,
                  num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(5)).images
    for a, b in zip(ours, theirs):
        assert np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 1
    params = read_parameters(tmp_path / "000005-000.png")
    assert params["seed"] == 5 and params["scale"] == 0.7 and params["negative_prompt"] == ""
    assert params["guidance"] == 7.5  # the pipeline's default, recorded as used


def test_bad_inputs_fail_before_any_model_work(setup, tmp_path, capsys):
    root, base, encoder = setup
    (tmp_path / "broken.png").write_bytes(b"nope")
    cases = [
        (["--image", str(tmp_path / "missing.png")], "image not found"),
        (["--image", str(tmp_path / "broken.png")], "cannot read .*broken.png as an image"),
        (["--image", str(root / "ref.png"), "--adapter", str(tmp_path / "none.bin")], "adapter not found"),
        (["--image", str(root / "ref.png"), "--adapter", str(root / "ip-adapter.safetensors"), "--strength", "2"],
         r"--strength must be in \(0, 1\], found 2.0"),
    ]
    import re

    for extra, message in cases:
        assert main(["generate", *extra, "--base", str(tmp_path / "no-model")]) == 2
        assert re.search(message, capsys.readouterr().err)
