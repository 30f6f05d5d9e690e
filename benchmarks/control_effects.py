"""What the generation controls do on the tiny world, measured with the attribute reader (the numbers in
docs/controls.md; tests/test_tinyworld_controls.py asserts the same effects on fewer images).

    python benchmarks/control_effects.py [--n 32] [--steps 10] [--out docs/control_effects.md]

Image-only prompting on held-out references (guidance 4, fixed seeds):
- presets: the fraction of generations that keep each attribute of the reference with no adapter (scale 0), the
  full adapter, the style preset and the composition preset;
- masks: references whose shape sits on the left (top), with a mask over the right (bottom) half: where the
  generated shape lands (inside the mask / on the reference's own side), against no adapter, and the colour kept.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from ipadapter.tinyworld.evaluate import held_out_scenes, load_tinyworld
from ipadapter.tinyworld.world import ATTRIBUTES, render


def half_mask(name: str, size: int = 64) -> torch.Tensor:
    """A size x size mask, white on one half: left, right, top or bottom."""
    mask = torch.zeros(size, size)
    h = size // 2
    rows, cols = {"left": (slice(None), slice(0, h)), "right": (slice(None), slice(h, None)),
                  "top": (slice(0, h), slice(None)), "bottom": (slice(h, None), slice(None))}[name]  # fmt: skip
    mask[rows, cols] = 1
    return mask


@torch.no_grad()
def reads(world, references, steps: int, seed: int, **controls):
    _, prompter, reader = world
    out = []
    for start in range(0, len(references), 64):
        chunk = references[start : start + 64]
        images = prompter(image=chunk, prompt=[""] * len(chunk), num_inference_steps=steps, guidance_scale=4.0,
                          generator=torch.Generator("cpu").manual_seed(seed + start), **controls).images  # fmt: skip
        out += reader.predict(images)
    return out


def kept(scenes, found, name: str) -> float:
    return sum(getattr(s, name) == getattr(r, name) for s, r in zip(scenes, found)) / len(scenes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="tinyworld-base")
    parser.add_argument("--n", type=int, default=32, help="references per measurement (and per mask side)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    world = load_tinyworld(args.adapter)
    lines = [f"# Control effects on the tiny world ({args.adapter}, {args.n} references, {args.steps} DDIM steps, "
             "guidance 4)", "", "Written by `python benchmarks/control_effects.py`.", "",
             "## Presets: fraction of image-only generations that keep each attribute of the reference", "",
             "| adapter | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---|" * len(ATTRIBUTES)]  # fmt: skip
    scenes = held_out_scenes(args.n, 4242)
    references = [render(s) for s in scenes]
    for label, controls in (("none (scale 0)", {"scale": 0.0}), ("full adapter (scale 1)", {}),
                            ("preset style", {"preset": "style"}), ("preset composition", {"preset": "composition"})):
        found = reads(world, references, args.steps, 0, **controls)
        lines.append(f"| {label} | " + " | ".join(f"{kept(scenes, found, a):.2f}" for a in ATTRIBUTES) + " |")
    lines += ["", "## Masks: the reference's shape on one side, the mask over the other half", "",
              "| reference at | mask over | shape inside the mask | shape on the reference's side | colour kept | "
              "no adapter: inside | no adapter: reference's side | no adapter: colour |", "|---|---|---|---|---|---|---|---|"]
    for side, other in (("left", "right"), ("top", "bottom")):
        scenes = [replace(s, position=side, size="medium") for s in held_out_scenes(args.n, 31)]
        references = [render(s) for s in scenes]
        masked = reads(world, references, args.steps, 0, mask=half_mask(other))
        off = reads(world, references, args.steps, 0, scale=0.0)
        n = len(scenes)
        lines.append(f"| {side} | {other} | {sum(r.position == other for r in masked)} / {n} | "
                     f"{sum(r.position == side for r in masked)} / {n} | {kept(scenes, masked, 'color'):.2f} | "
                     f"{sum(r.position == other for r in off)} / {n} | {sum(r.position == side for r in off)} / {n} | "
                     f"{kept(scenes, off, 'color'):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
