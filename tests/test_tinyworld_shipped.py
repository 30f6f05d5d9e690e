"""The shipped tiny world: it loads like a real model, fits its size budget, and its adapters really prompt."""

from __future__ import annotations

import torch
from PIL import Image

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.sources import TINYWORLD_DIR, load_pipeline, resolve_adapter, resolve_image_encoder
from ipadapter.tinyworld.evaluate import EvalSettings, evaluate, load_tinyworld


def test_loads_like_a_real_stable_diffusion_model():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    pipe = StableDiffusionPipeline.from_pretrained(str(TINYWORLD_DIR / "sd"))  # exactly as a user would
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32
    vision = CLIPVisionModelWithProjection.from_pretrained(str(TINYWORLD_DIR / "sd" / "image_encoder"))
    assert vision.config.image_size == 64
    weights = sum(p.stat().st_size for p in TINYWORLD_DIR.rglob("*.safetensors"))
    assert weights <= 30 * 1024**2, f"tiny world weights are {weights / 1024**2:.1f} MiB, budget 30"


def test_shipped_adapters_fit_the_shipped_model():
    pipe = load_pipeline("tinyworld")
    encoder = ImageEncoder.from_pretrained(resolve_image_encoder("tinyworld"))
    for name, tokens, feature in (("tinyworld-base", 4, "pooled"), ("tinyworld-plus", 16, "penultimate")):
        adapter = IPAdapter.from_file(resolve_adapter(name), unet=pipe.unet, image_encoder=encoder)
        assert adapter.config.num_tokens == tokens and adapter.config.image_feature == feature
        assert adapter.image_proj.state_dict()[next(iter(adapter.image_proj.state_dict()))].dtype == torch.float16


def test_image_prompt_carries_the_reference_attributes():
    """Image-only prompting at scale 1 preserves far more of the reference than the same sampler at scale 0."""
    pipe, prompter, reader = load_tinyworld("tinyworld-base")
    settings = EvalSettings(n=16, steps=10, batch_size=16)
    with_prompt = evaluate(pipe, prompter, reader, "image", 1.0, settings)
    without = evaluate(pipe, prompter, reader, "image", 0.0, settings)
    assert with_prompt.cp >= without.cp + 0.2, (with_prompt, without)


def test_demo_writes_a_labelled_grid(tmp_path):
    from ipadapter.cli import main

    assert main(["demo", "--out", str(tmp_path), "--steps", "4"]) == 0
    grid = Image.open(tmp_path / "demo.png")
    # four rows; full scene captions (text-only row) need three lines of text under their cells, and get them
    assert grid.size[0] == 150 + 4 * 128 and grid.size[1] % 4 == 0 and grid.size[1] // 4 >= 128 + 8 + 12 * 3


def test_shipped_image_text_encoder_shares_the_image_encoders_space():
    """InstantStyle's content subtraction needs the text tower paired with the image encoder."""
    import torch.nn.functional as F

    from ipadapter.encoders import ImageEncoder, TextEmbedder
    from ipadapter.tinyworld.world import Scene, render

    text = TextEmbedder.from_pretrained("tinyworld")
    image = ImageEncoder.from_pretrained(resolve_image_encoder("tinyworld"))
    red = image.encode([render(Scene("circle", "red", "solid", "black", "large", "center"))], "pooled")  # (1, D)
    words = text.encode(["a red shape", "a blue shape", "a green shape"])  # (3, D)
    assert words.shape == (3, red.shape[1])
    sims = (F.normalize(red, dim=-1) @ F.normalize(words, dim=-1).T)[0]
    assert sims[0] > sims[1] and sims[0] > sims[2]
