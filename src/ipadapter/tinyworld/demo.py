"""`ipadapter demo`: one labelled PNG grid from the embedded tiny world, offline, on a CPU, in seconds.

Rows: the reference images; image-only generations (scale 1, empty text); image + text where the text changes one
attribute the image fixes; text-only generations from the reference's full caption.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .world import Scene, caption, render

# (reference scene, the attribute the text changes, its new value)
DEMO = [
    (Scene("circle", "red", "striped", "white", "large", "center"), "background", "black"),
    (Scene("star", "blue", "solid", "pink", "large", "left"), "color", "yellow"),
    (Scene("square", "green", "dotted", "gray", "medium", "right"), "shape", "triangle"),
    (Scene("cross", "purple", "solid", "black", "large", "top"), "pattern", "striped"),
]
CELL = 128  # pixels per image in the grid (64 px images, upscaled 2x)
GUIDANCE = 4.0  # classifier-free guidance for the tiny world (its UNet saw 10% empty captions), as in its checks
LABEL = 150  # width of the row-label column


def _text_for(scene: Scene, attribute: str, value: str) -> str:
    return caption(replace(scene, **{attribute: value}), [attribute])


def run_demo(out: str | Path = "ipadapter-demo", seed: int = 0, steps: int = 20, scale_text: float = 0.5,
             adapter: str = "tinyworld-base") -> Path:
    """Writes the demo grid and returns its path."""
    from ..adapter import IPAdapter
    from ..encoders import ImageEncoder
    from ..prompter import ImagePrompter
    from ..sources import load_pipeline, resolve_adapter, resolve_image_encoder

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, found {steps}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; expected a folder (it receives demo.png)")
    out.mkdir(parents=True, exist_ok=True)  # before any model work: a bad path costs nothing
    started = time.perf_counter()
    pipe = load_pipeline("tinyworld")
    pipe.set_progress_bar_config(disable=True)
    encoder = ImageEncoder.from_pretrained(resolve_image_encoder("tinyworld"))
    ip = IPAdapter.from_file(resolve_adapter(adapter), dtype=torch.float32, image_encoder=encoder)
    prompter = ImagePrompter(pipe, ip, encoder)
    references = [render(scene) for scene, _, _ in DEMO]
    edits = [_text_for(scene, attribute, value) for scene, attribute, value in DEMO]
    full = [caption(scene, scene.as_dict()) for scene, _, _ in DEMO]
    common = {"num_inference_steps": steps, "guidance_scale": GUIDANCE, "height": 64, "width": 64}

    def gen() -> torch.Generator:
        return torch.Generator("cpu").manual_seed(seed)

    image_only = prompter(image=references, prompt=[""] * len(DEMO), scale=1.0, generator=gen(), **common).images
    image_text = prompter(image=references, prompt=edits, scale=scale_text, generator=gen(), **common).images
    prompter.detach()
    text_only = pipe(prompt=full, generator=gen(), **common).images
    rows = [
        ("reference", references, None),
        ("image only\nscale 1.0", image_only, None),
        (f"image + text\nscale {scale_text}", image_text, edits),
        ("text only", text_only, full),
    ]
    path = _grid(rows, Path(out))
    print(f"wrote {path} in {time.perf_counter() - started:.1f} s")
    return path


def _grid(rows: list[tuple[str, list[Image.Image], list[str] | None]], out: Path) -> Path:
    import textwrap

    columns = max(len(images) for _, images, _ in rows)
    wrapped = [[textwrap.wrap(t or '""', width=22) for t in texts] if texts else [] for _, _, texts in rows]
    lines_needed = max((len(lines) for row in wrapped for lines in row), default=0)
    row_h = CELL + max(30, 8 + 12 * lines_needed)  # every caption whole (a prompt cut short would misstate it)
    grid = Image.new("RGB", (LABEL + columns * CELL, row_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images, texts) in enumerate(rows):
        y = r * row_h
        draw.multiline_text((6, y + CELL // 2 - 12), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((CELL, CELL), Image.NEAREST), (LABEL + c * CELL, y))
            if texts:
                lines = wrapped[r][c]
                draw.multiline_text((LABEL + c * CELL + 2, y + CELL + 2), "\n".join(lines), fill="black", spacing=1)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.png"
    grid.save(path)
    return path.resolve()
