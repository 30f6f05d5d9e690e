"""Measuring image prompts on the tiny world: Concept Preservation (CP), Prompt Following (PF) and CP x PF.

Three protocols, each on `n` unseen-render scenes (seeded: images no training saw, though their attribute combinations
mostly occur in training; docs/tinyworld.md), generated with the same sampler settings:

- text only: the scene's full caption, no adapter -> PF over the caption's attributes;
- image only: the rendered scene as reference, empty text, scale lambda -> CP over all attributes;
- image + text: the reference plus a text that sets ONE attribute to a different value ("on a black background")
  -> CP over the reference's other attributes, PF over the stated one.

The generated images are read by the shipped attribute reader (`reader.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from .metrics import concept_preservation, prompt_following
from .world import ATTRIBUTES, Scene, caption, render, sample_scene

PROTOCOLS = ("text", "image", "image+text")


@dataclass(frozen=True)
class EvalSettings:
    """Sampler settings shared by every protocol."""

    n: int = 200  # unseen-render scenes
    seed: int = 4242  # scenes and initial noise
    steps: int = 25  # DDIM steps
    guidance_scale: float = 4.0  # classifier-free guidance
    batch_size: int = 50  # images per pipeline call
    edit_attributes: tuple[str, ...] = ("background", "color", "shape", "pattern")  # what image+text edits

    def __post_init__(self) -> None:
        for name in ("n", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")


@dataclass(frozen=True)
class EvalResult:
    protocol: str  # text | image | image+text
    scale: float  # adapter scale (0 for text only)
    n: int  # scenes
    cp: float | None  # mean concept preservation
    pf: float | None  # mean prompt following
    cp_x_pf: float | None  # mean CP x mean PF

    def row(self) -> str:
        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.3f}"

        return f"| {self.protocol} | {self.scale:g} | {self.n} | {f(self.cp)} | {f(self.pf)} | {f(self.cp_x_pf)} |"


def held_out_scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def edit_for(scene: Scene, index: int, settings: EvalSettings, seed: int) -> tuple[str, str]:
    """(attribute, new value) for the image+text protocol: cycles through edit_attributes, value != the scene's."""
    attribute = settings.edit_attributes[index % len(settings.edit_attributes)]
    rng = random.Random(seed * 7919 + index)
    value = rng.choice([v for v in ATTRIBUTES[attribute] if v != getattr(scene, attribute)])
    return attribute, value


@torch.no_grad()
def evaluate(pipe, prompter, reader, protocol: str, scale: float = 1.0, settings: EvalSettings = EvalSettings(),
             preset: str | None = None) -> EvalResult:  # fmt: skip
    """Runs one protocol; `prompter` (an ImagePrompter on `pipe`) is unused for text only; `preset` is a per-block
    preset (`blocks.PRESETS`) applied with `scale`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, found {protocol!r}")
    scenes = held_out_scenes(settings.n, settings.seed)
    cps: list[float] = []
    pfs: list[float] = []
    for start in range(0, len(scenes), settings.batch_size):
        chunk = scenes[start : start + settings.batch_size]
        g = torch.Generator("cpu").manual_seed((settings.seed + start) % 2**64)
        common = {"num_inference_steps": settings.steps, "guidance_scale": settings.guidance_scale, "generator": g,
                  "height": 64, "width": 64}
        if protocol == "text":
            texts = [caption(s, ATTRIBUTES) for s in chunk]
            attached = prompter is not None and prompter.adapter.attached
            if attached:  # text only means the plain model
                prompter.detach()
            images = pipe(prompt=texts, **common).images
            if attached:
                prompter.adapter.attach(pipe.unet)
            for s, read in zip(chunk, reader.predict(images)):
                pfs.append(prompt_following(s.as_dict(), read))
            continue
        references = [render(s) for s in chunk]
        if protocol == "image":
            images = prompter(image=references, prompt=[""] * len(chunk), scale=scale, preset=preset, **common).images
            cps.extend(concept_preservation(s, r) for s, r in zip(chunk, reader.predict(images)))
            continue
        edits = [edit_for(s, start + i, settings, settings.seed) for i, s in enumerate(chunk)]
        texts = [caption(replace(s, **{a: v}), [a]) for s, (a, v) in zip(chunk, edits)]
        images = prompter(image=references, prompt=texts, scale=scale, preset=preset, **common).images
        for s, (a, v), read in zip(chunk, edits, reader.predict(images)):
            kept = [name for name in ATTRIBUTES if name != a]
            cps.append(concept_preservation(s, read, kept))
            pfs.append(prompt_following({a: v}, read))
    cp = sum(cps) / len(cps) if cps else None
    pf = sum(pfs) / len(pfs) if pfs else None
    both = cp * pf if cp is not None and pf is not None else None
    return EvalResult(protocol, 0.0 if protocol == "text" else scale, len(scenes), cp, pf, both)


def load_tinyworld(adapter: str = "tinyworld-base", device: str = "cpu", base: str = "tinyworld", controlnet=None):
    """(pipe, prompter, reader) on the shipped tiny world (or a model derived from it: `base` folder, `controlnet`)."""
    from ..adapter import IPAdapter
    from ..encoders import ImageEncoder
    from ..prompter import ImagePrompter
    from ..sources import load_pipeline, resolve_adapter, resolve_image_encoder
    from .reader import load_reader

    pipe = load_pipeline(base, device=device, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    encoder = ImageEncoder.from_pretrained(resolve_image_encoder(base) or resolve_image_encoder("tinyworld"), device=device)
    ip = IPAdapter.from_file(resolve_adapter(adapter), dtype=torch.float32, image_encoder=encoder)
    return pipe, ImagePrompter(pipe, ip, encoder), load_reader()


def markdown_table(results: list[EvalResult], title: str = "") -> str:
    lines = ([f"**{title}**", ""] if title else []) + [
        "| protocol | scale | n | CP | PF | CP x PF |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + [r.row() for r in results])

