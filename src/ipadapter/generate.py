"""`ipadapter generate`: image-prompted generation from the command line, with every input checked first.

The library function `generate()` does what the CLI does: check inputs, load the pipeline (the tiny world unless a
base is given), the adapter and its image encoder, run, and save PNGs whose text metadata holds every parameter.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .images import load_image


@dataclass
class GenerateConfig:
    """One `ipadapter generate` call."""

    images: list[str] = field(default_factory=list)  # reference image files (one for all prompts, or one per image)
    prompt: str = ""  # text prompt ("" = image-only prompting)
    negative_prompt: str = ""  # negative text prompt (default empty, as diffusers)
    negative_images: list[str] = field(default_factory=list)  # images used as the unconditional image prompt
    scale: float = 1.0  # image prompt weight lambda
    start: float = 0.0  # the image prompt acts from this fraction of the denoising ...
    end: float = 1.0  # ... up to this fraction
    steps: int | None = None  # denoising steps (default: the pipeline's)
    guidance: float | None = None  # classifier-free guidance (default: the pipeline's)
    seed: int = 0  # torch.Generator("cpu").manual_seed(seed), as diffusers users write it
    num_images: int = 1  # images per reference
    base: str = "tinyworld"  # diffusers folder, single checkpoint file, hub id, or tinyworld
    adapter: str = "tinyworld-base"  # IP-Adapter file (official layout or ours), or tinyworld-base / tinyworld-plus
    image_encoder: str = ""  # CLIP image encoder folder or hub id (default: the base's image_encoder/)
    init_image: str = ""  # image-to-image: the starting image
    strength: float = 0.6  # image-to-image: how much of the starting image is replaced
    out: str = "outputs"  # output folder
    device: str = "cpu"  # where to run
    show_progress: bool = True  # denoising progress bar


def check_inputs(cfg: GenerateConfig) -> None:
    """Every file and value is checked before any model is loaded (errors name what was expected and found)."""
    from .sources import resolve_adapter

    for path in [*cfg.images, *cfg.negative_images, *([cfg.init_image] if cfg.init_image else [])]:
        load_image(path)  # FileNotFoundError / ValueError with the path
    if not cfg.images:
        raise ValueError("expected at least one reference image (--image), found none")
    adapter = resolve_adapter(cfg.adapter)
    if not Path(adapter).is_file():
        raise FileNotFoundError(f"adapter not found: {adapter}")
    if cfg.num_images < 1 or (cfg.steps is not None and cfg.steps < 1):
        raise ValueError(f"--num-images and --steps must be >= 1, found {cfg.num_images} and {cfg.steps}")
    if not 0 <= cfg.start <= cfg.end <= 1:
        raise ValueError(f"expected 0 <= --start <= --end <= 1, found {cfg.start} and {cfg.end}")
    if not 0 < cfg.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], found {cfg.strength}")


def generate(cfg: GenerateConfig) -> list[Path]:
    """Runs `cfg`; returns the written PNG paths."""
    from .adapter import IPAdapter
    from .encoders import ImageEncoder
    from .prompter import ImagePrompter
    from .sources import load_pipeline, resolve_adapter, resolve_image_encoder

    check_inputs(cfg)
    kind = "image2image" if cfg.init_image else "text2image"
    pipe = load_pipeline(cfg.base, device=cfg.device, kind=kind)
    pipe.set_progress_bar_config(disable=not cfg.show_progress)
    defaults = inspect.signature(pipe.__call__).parameters  # record what the pipeline will really use
    steps = cfg.steps if cfg.steps is not None else defaults["num_inference_steps"].default
    guidance = cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"].default
    adapter = IPAdapter.from_file(resolve_adapter(cfg.adapter), dtype=torch.float32, unet=pipe.unet)
    encoder = None
    if adapter.config.image_feature != "none":
        path = resolve_image_encoder(cfg.base, cfg.image_encoder)
        if not path:
            raise ValueError(f"this adapter needs {adapter.config.image_encoder_name}; pass --image-encoder")
        encoder = ImageEncoder.from_pretrained(path, device=cfg.device)
    prompter = ImagePrompter(pipe, adapter, encoder)  # checks the encoder against the adapter
    references = [load_image(p) for p in cfg.images]
    kwargs: dict = {"negative_prompt": cfg.negative_prompt, "num_images_per_prompt": cfg.num_images,
                    "generator": torch.Generator("cpu").manual_seed(cfg.seed), "num_inference_steps": steps}
    if cfg.init_image:
        kwargs.update(image=load_image(cfg.init_image), strength=cfg.strength)
    negatives = [load_image(p) for p in cfg.negative_images] or None
    prompts = [cfg.prompt] * len(references)
    images = prompter(image=references, prompt=prompts if len(references) > 1 else cfg.prompt, scale=cfg.scale,
                      negative_image=negatives, guidance_scale=guidance, start=cfg.start, end=cfg.end,
                      **kwargs).images
    prompter.detach()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = PngImagePlugin.PngInfo()
    params = {**{k: v for k, v in asdict(cfg).items() if k != "show_progress"}, "steps": steps, "guidance": guidance}
    meta.add_text("ipadapter", json.dumps(params))
    meta.add_text("parameters", f"{cfg.prompt}\nNegative prompt: {cfg.negative_prompt}\nSteps: {steps}, "
                                f"CFG scale: {guidance}, Seed: {cfg.seed}, IP-Adapter: {cfg.adapter} ({cfg.scale})")
    paths = []
    for i, image in enumerate(images):
        path = out / f"{cfg.seed:06d}-{i:03d}.png"
        image.save(path, pnginfo=meta)
        paths.append(path)
    return paths


def read_parameters(path: str | Path) -> dict:
    """The generation parameters stored in a PNG written by `generate`."""
    with Image.open(path) as image:
        return json.loads(image.text["ipadapter"])
