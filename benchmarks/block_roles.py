"""What each UNet transformer carries from the image prompt, on the tiny world (InstantStyle's method, measured).

    python benchmarks/block_roles.py [--adapter tinyworld-base] [--n 64] [--out docs/block_roles.md]

For every transformer t of the UNet: the adapter acts only at t (scale `--scale`, every other layer 0), image-only
prompting on held-out references; the attribute reader measures which attributes of the reference the images
keep. Then the same for the named presets (style, composition, style_and_composition, linear). A "style" layer keeps
colour / pattern / background and not position / shape; a "composition" layer the reverse.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ipadapter.blocks import preset_weights, transformers
from ipadapter.tinyworld.evaluate import held_out_scenes, load_tinyworld
from ipadapter.tinyworld.world import ATTRIBUTES, render


@torch.no_grad()
def kept(prompter, reader, scenes, scales, steps: int, guidance: float, seed: int) -> dict[str, float]:
    out = {name: 0.0 for name in ATTRIBUTES}
    for start in range(0, len(scenes), 64):
        chunk = scenes[start : start + 64]
        images = prompter(image=[render(s) for s in chunk], prompt=[""] * len(chunk), scale=scales,
                          num_inference_steps=steps, guidance_scale=guidance,
                          generator=torch.Generator("cpu").manual_seed(seed + start)).images  # fmt: skip
        for s, read in zip(chunk, reader.predict(images)):
            for name in ATTRIBUTES:
                out[name] += getattr(s, name) == getattr(read, name)
    return {name: v / len(scenes) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="tinyworld-base")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    pipe, prompter, reader = load_tinyworld(args.adapter)
    names = prompter.adapter.layer_names
    scenes = held_out_scenes(args.n, args.seed)
    rows = []
    baseline = kept(prompter, reader, scenes, 0.0, args.steps, args.guidance, args.seed)
    rows.append(["none (scale 0)", *baseline.values()])
    for t in transformers(names):
        scales = [args.scale if n.startswith(t + ".") else 0.0 for n in names]
        rows.append([t, *kept(prompter, reader, scenes, scales, args.steps, args.guidance, args.seed).values()])
    for preset in ("style", "composition", "style_and_composition", "linear"):
        scales = preset_weights(names, preset, args.scale)
        rows.append([f"preset {preset}", *kept(prompter, reader, scenes, scales, args.steps, args.guidance, args.seed).values()])
    lines = [f"# What each transformer carries ({args.adapter}, {args.n} references, scale {args.scale})", "",
             "Fraction of image-only generations that keep each attribute of the reference when the adapter acts "
             "only there. Written by `python benchmarks/block_roles.py`.", "",
             "| where the adapter acts | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---|" * len(ATTRIBUTES)]  # fmt: skip
    lines += ["| " + row[0] + " | " + " | ".join(f"{x:.2f}" for x in row[1:]) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
