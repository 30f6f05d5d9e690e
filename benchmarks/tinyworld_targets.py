"""The tiny world's targets, measured on unseen-render scenes with the attribute reader.

    python benchmarks/tinyworld_targets.py [--n 200] [--scales 0,0.25,0.5,0.75,1.0] [--out docs/tinyworld_targets.md]

Prints (and writes as Markdown): text-only PF; image-only CP (base, scale 1.0); image + text (the text changes one
attribute the reference fixes) CP / PF at each scale for base and Plus, and the best scale by CP x PF.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ipadapter.tinyworld.evaluate import EvalSettings, evaluate, load_tinyworld, markdown_table

TARGETS = {"text PF": 0.85, "image CP": 0.8, "image+text CP": 0.7, "image+text PF": 0.7}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="unseen-render scenes per measurement")
    parser.add_argument("--scales", default="0,0.25,0.5,0.75,1.0", help="scale sweep for image + text")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--out", default="", help="also write the tables to this Markdown file")
    parser.add_argument("--device", default="cpu", help="where the pipeline runs (the noise is drawn on the CPU)")
    args = parser.parse_args()
    settings = EvalSettings(n=args.n, steps=args.steps, guidance_scale=args.guidance)
    scales = [float(s) for s in args.scales.split(",")]
    started = time.perf_counter()
    sections, summary = [], {}
    for variant in ("base", "plus"):
        pipe, prompter, reader = load_tinyworld(f"tinyworld-{variant}", device=args.device)
        results = []
        if variant == "base":
            text = evaluate(pipe, prompter, reader, "text", settings=settings)
            results.append(text)
            summary["text PF"] = text.pf
        image = evaluate(pipe, prompter, reader, "image", 1.0, settings)
        results.append(image)
        summary[f"{variant} image CP"] = image.cp
        sweep = [evaluate(pipe, prompter, reader, "image+text", s, settings) for s in scales]
        results.extend(sweep)
        best = max(sweep, key=lambda r: r.cp_x_pf or 0.0)
        summary[f"{variant} image+text best scale"] = best.scale
        summary[f"{variant} image+text CP"] = best.cp
        summary[f"{variant} image+text PF"] = best.pf
        sections.append(markdown_table(results, f"{variant} adapter"))
        print(sections[-1], "\n", flush=True)
    checks = [
        ("text-only PF >= 0.85", summary["text PF"], 0.85),
        ("image-only CP (base, scale 1.0) >= 0.8", summary["base image CP"], 0.8),
        ("image + text CP >= 0.7 at the best scale (base)", summary["base image+text CP"], 0.7),
        ("image + text PF >= 0.7 at the best scale (base)", summary["base image+text PF"], 0.7),
    ]
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {'yes' if value >= goal else 'no'} |" for name, value, goal in checks]
    table = "\n".join(lines)
    print(table)
    footer = (f"\n{args.n} unseen-render scenes per row, DDIM {args.steps} steps, guidance {args.guidance}, "
              f"torch threads {torch.get_num_threads()}, {time.perf_counter() - started:.0f} s in all.")
    print(footer)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# Tiny world targets\n\n" + "Produced by `python benchmarks/tinyworld_targets.py`.\n\n"
                                  + table + "\n\n" + "\n\n".join(sections) + "\n" + footer + "\n")


if __name__ == "__main__":
    main()
