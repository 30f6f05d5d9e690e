"""`ipadapter` command line: a thin layer over importable functions. Every subcommand is `main([...])`-testable."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import describe

    info = describe(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        label = key.replace("_", " ")
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        print(f"{label:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import os
    import tempfile
    from pathlib import Path

    import torch

    from .checkpoint import load_adapter, save_adapter

    source, target = Path(args.input), Path(args.output)
    if target.exists() and source.exists() and os.path.samefile(source, target):
        raise ValueError(f"the output {target} is the input file: converting onto it would replace the original; "
                         "write another file")  # fmt: skip
    if target.is_dir():
        raise ValueError(f"the output {target} is a folder; expected a file name to write")
    if target.exists() and not args.force:
        raise ValueError(f"the output {target} exists; it is not replaced without --force")
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"the output {target} cannot be written: {blocking} is a file, not a folder")
    adapter = load_adapter(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target, read back and compared, then renamed into place: what a reader will find in the
    # file must be this adapter (the official layout carries no config: it is detected again from keys, shapes and
    # the file name, which can lose what only the name tells, e.g. FaceID-PlusV2's "plusv2")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        written = Path(tmp) / target.name
        save_adapter(adapter, written, layout=args.to)
        back = load_adapter(written)
        keep = ("variant", "extra")  # names and provenance: the official layout has no place for them
        want = {k: v for k, v in vars(adapter.config).items() if k not in keep}
        got = {k: v for k, v in vars(back.config).items() if k not in keep}
        differ = [f"{k}: {want[k]!r} -> {got[k]!r}" for k in want if want[k] != got[k]]
        mine, theirs = adapter.state_dict(), back.state_dict()
        if not differ and (mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine)):
            differ = ["the tensors"]
        if differ:
            hint = " (name the output ...plusv2... : the official layout tells PlusV2 by its file name)" \
                if adapter.config.shortcut else ""  # fmt: skip
            raise ValueError(f"{target.name} would not read back as this adapter ({'; '.join(differ)}){hint}; "
                             "nothing was written")  # fmt: skip
        os.replace(written, target)
    print(f"wrote {target} ({args.to} layout, {adapter.config.variant})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .sources import check_seed
    from .tinyworld.demo import run_demo

    check_seed(args.seed)
    run_demo(args.out, seed=args.seed, steps=args.steps)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .generate import GenerateConfig, generate

    values = {f.name: getattr(args, f.name) for f in fields(GenerateConfig) if getattr(args, f.name, None) is not None}
    # options that only act beside another one: given alone they would be silently ignored
    for flag, name, needs, needed in (("--strength", "strength", "--init-image", "init_image"),
                                      ("--controlnet-scale", "controlnet_scale", "--controlnet", "controlnet"),
                                      ("--t2i-adapter-scale", "t2i_adapter_scale", "--t2i-adapter", "t2i_adapter"),
                                      ("--content-scale", "content_scale", "--content-text", "content_text")):  # fmt: skip
        if name in values and not values.get(needed):
            raise ValueError(f"{flag} acts only with {needs}, which was not given")
    if (values.get("combine") and not values.get("embeds") and len(values.get("images") or []) < 2
            and values.get("prep") != "tiles"):  # (saved embeddings may hold several references)
        raise ValueError("--combine mixes several references (or the tiles of --prep tiles); one --image was given")
    if values.get("guidance") is not None and values["guidance"] <= 1:
        negatives = [flag for flag, name in (("--negative-prompt", "negative_prompt"),
                                             ("--negative-image", "negative_images"),
                                             ("--negative-noise", "negative_noise")) if values.get(name)]  # fmt: skip
        if negatives:
            raise ValueError(f"{', '.join(negatives)} act(s) only with classifier-free guidance (--guidance > 1); "
                             f"found --guidance {values['guidance']:g}")  # fmt: skip
    for path in generate(GenerateConfig(**values)):
        print(path)
    return 0


def cmd_eval_clip(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .evaluation.clip_eval import ClipEvalConfig, markdown, run_clip_eval

    values = {f.name: getattr(args, f.name) for f in fields(ClipEvalConfig) if getattr(args, f.name, None) is not None}
    summary = run_clip_eval(ClipEvalConfig(**values))
    print(markdown(summary))
    if not summary["pairs"]:
        print(f"error: no pair of {summary['config']['data']} was evaluated ({summary['skipped']} skipped: reference "
              "image missing or unreadable)", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def cmd_eval_tinyworld(args: argparse.Namespace) -> int:
    from pathlib import Path

    import math

    from .blocks import PRECISE, PRESETS
    from .sources import check_seed, resolve_adapter
    from .tinyworld.evaluate import EvalSettings, evaluate, load_tinyworld, markdown_table

    check_seed(args.seed)
    for flag, value in (("--n", args.n), ("--steps", args.steps)):
        if value < 1:  # (EvalSettings names its fields, not the flags)
            raise ValueError(f"{flag} must be >= 1, found {value}")
    settings = EvalSettings(n=args.n, seed=args.seed, steps=args.steps, guidance_scale=args.guidance)
    # everything is checked before the models load
    if not Path(resolve_adapter(args.adapter)).is_file():
        raise FileNotFoundError(f"adapter not found: {args.adapter} (expected tinyworld-base, tinyworld-plus or a file)")
    for flag, values in (("--scale", args.scale), ("--guidance", [args.guidance])):
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{flag} must be finite numbers, found {' '.join(map(str, values))}")
    if args.preset and args.preset not in (*PRESETS, *PRECISE):
        raise ValueError(f"unknown --preset {args.preset!r}; expected one of {', '.join((*PRESETS, *PRECISE))}")
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; expected a file for the Markdown table")
    if args.out:
        above = next((p for p in Path(args.out).parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ValueError(f"--out {args.out} cannot be written: {above} is a file, not a folder")
    pipe, prompter, reader = load_tinyworld(args.adapter)
    results = []
    for protocol in args.protocol:
        for scale in ([0.0] if protocol == "text" else args.scale):
            results.append(evaluate(pipe, prompter, reader, protocol, scale, settings, preset=args.preset))
    title = f"adapter {args.adapter}" + (f", preset {args.preset}" if args.preset else "") + f", {settings.steps} steps"
    table = markdown_table(results, title)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return 0


def cmd_eval_face(args: argparse.Namespace) -> int:
    import json

    from .evaluation.faces import fid, identity_similarity, lpips
    from .faces import FaceEmbedder
    from .images import load_image

    reference = load_image(args.reference)
    generated = [load_image(p) for p in args.generated]
    if args.fid_real and min(len(args.fid_real), len(generated)) < 2:  # before any model loads
        raise ValueError(f"FID compares two image sets: expected at least 2 images in each, found "
                         f"{len(args.fid_real)} --fid-real and {len(generated)} --generated")  # fmt: skip
    if args.no_identity and not (args.fid_real or args.lpips):
        raise ValueError("--no-identity leaves nothing to measure: add --fid-real and / or --lpips")
    report: dict = {}
    if not args.no_identity:
        embedder = FaceEmbedder(name=args.insightface_model, root=args.insightface_root,
                                instead="--no-identity to measure FID / LPIPS only")  # fmt: skip
        scores = identity_similarity(embedder, generated, reference)
        found = [s for s in scores if s is not None]
        report["identity_similarity"] = sum(found) / len(found) if found else None
        report["faces_found"] = f"{len(found)}/{len(scores)}"
    if args.fid_real:
        real = [load_image(p) for p in args.fid_real]
        report["fid"] = fid(real, generated)
        report["fid_images"] = {"real": len(real), "generated": len(generated)}  # FIDs compare at equal set sizes only
    if args.lpips:
        report["lpips_to_reference"] = lpips(generated, [reference] * len(generated))
    print(json.dumps(report, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipadapter", description="IP-Adapter image prompts for Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="describe a checkpoint: variant, tokens, base model, the image encoder it needs")
    p.add_argument("checkpoint", help="an IP-Adapter .safetensors or .bin file (official layout or ours)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="convert between the official layout and ipadapter's self-describing format")
    p.add_argument("input", help="checkpoint to read (any supported layout, incl. the official trainer's state)")
    p.add_argument("output", help="file to write (.safetensors; .bin also allowed for --to official)")
    p.add_argument("--to", choices=["official", "ipadapter"], required=True, help="layout to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file (refused without it)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate images from reference image(s) and an optional text prompt")
    p.add_argument("--image", dest="images", nargs="+", metavar="REF", help="reference image file(s), combined into one image prompt")
    p.add_argument("--embeds", help="saved reference embeddings (.safetensors from --save-embeds) instead of --image")
    p.add_argument("--save-embeds", help="also write the references' encoder features to this .safetensors file")
    p.add_argument("--combine", help="several references: concat (default), average, norm_average, add, subtract, max, min")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per reference image")
    p.add_argument("--prep", help="reference preparation: center_crop (default), pad, squash, tiles")
    p.add_argument("--image-mask", nargs="+", dest="image_masks", metavar="MASK",
                   help="which pixels of the reference(s) the image encoder sees (white); one for all, one each, or `alpha`: "
                   "each reference's own transparency")
    p.add_argument("--prompt", help='text prompt (default: "" = image-only prompting)')
    p.add_argument("--negative-prompt", help="negative text prompt (default: empty)")
    p.add_argument("--negative-image", dest="negative_images", nargs="+", metavar="IMG",
                   help="image(s) used as the unconditional image prompt (needs --guidance > 1)")
    p.add_argument("--negative-noise", type=float,
                   help="unconditional image = the reference with this much noise (0-1; needs --guidance > 1)")
    p.add_argument("--scale", type=float, help="image prompt weight (default: 1.0)")
    p.add_argument("--preset", help="per-block preset: style, composition, style_and_composition, strong_style, "
                                    "strong_style_and_composition, ease_in, ease_out, ease_in_out, reverse_in_out, "
                                    "weak_input, weak_output, weak_middle, strong_middle, linear, style_precise, composition_precise")  # fmt: skip
    p.add_argument("--composition-scale", type=float, help="composition weight of style_and_composition presets")
    p.add_argument("--scaling", help="where the scale acts: v (output; default), kv, kv_penalty, k_mean_v_penalty")
    p.add_argument("--boost", type=float, help="style_precise / composition_precise: weight of the reference as a negative")
    p.add_argument("--composition-image", help="style_and_composition with two images: the layout reference")
    p.add_argument("--mask", help="mask image: the image prompt acts only where it is white")
    p.add_argument("--content-text", help="InstantStyle: remove this text's meaning from the reference (base adapters)")
    p.add_argument("--content-scale", type=float, help="weight of --content-text (default: 1.0)")
    p.add_argument("--content-text-encoder", help="text tower paired with the image encoder (default: the tiny "
                   "world's pair, or an SDXL base's text_encoder_2)")
    p.add_argument("--start", type=float, help="image prompt active from this fraction of the steps (0)")
    p.add_argument("--end", type=float, help="image prompt active up to this fraction of the steps (1)")
    p.add_argument("--face-id", help="FaceID: .npy / .safetensors file with 512-d ArcFace embeddings")
    p.add_argument("--face-image", help="FaceID: embed the largest face of this image with insightface (local models)")
    p.add_argument("--s-scale", type=float, help="FaceID-PlusV2: weight of the face-structure branch (official "
                   "s_scale, ComfyUI weight_faceidv2; default 1.0)")
    p.add_argument("--insightface-root", help="insightface root holding models/buffalo_l (default: ~/.insightface)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (default: the pipeline's)")
    p.add_argument("--pag-scale", type=float, help="perturbed-attention guidance scale (default: 0, off; diffusers' "
                   "PAG pipelines, e.g. 3.0)")
    p.add_argument("--pag-layers", nargs="+", help="with --pag-scale: self-attention layers PAG perturbs, patterns of "
                   "UNet module names (default: mid; e.g. down_blocks.2 up_blocks.0)")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the pipeline's)")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the pipeline's)")
    p.add_argument("--seed", type=int, help='seed of torch.Generator("cpu") (default: 0)')
    p.add_argument("--num-images", type=int, help="images to generate (default: 1)")
    p.add_argument("--base", help="diffusers folder, checkpoint file or hub id (default: tinyworld)")
    p.add_argument("--base-config", help="with a single-file --base: the diffusers folder or hub id of its configs")
    p.add_argument("--adapter", help="IP-Adapter file (default: tinyworld-base; also tinyworld-plus)")
    p.add_argument("--image-encoder", help="CLIP image encoder folder or hub id (default: the base's)")
    p.add_argument("--init-image", help="image-to-image: the starting image")
    p.add_argument("--strength", type=float, help="image-to-image strength (default: 0.6)")
    p.add_argument("--inpaint-mask", help="inpainting (with --init-image): white where the image is repainted")
    p.add_argument("--controlnet", help="ControlNet folder or hub id (sees the text prompt only)")
    p.add_argument("--control-image", help="the ControlNet's condition image")
    p.add_argument("--controlnet-scale", type=float, help="controlnet_conditioning_scale (default: 1.0)")
    p.add_argument("--t2i-adapter", help="T2I-Adapter folder or hub id, with --control-image (text-to-image)")
    p.add_argument("--t2i-adapter-scale", type=float, help="adapter_conditioning_scale (default: 1.0)")
    p.add_argument("--out", help="output folder (default: outputs)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--dtype", help="weights dtype: float32 (default), float16 (GPUs), bfloat16")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="write a labelled PNG grid from the embedded tiny world (offline, CPU, seconds)")
    p.add_argument("--out", default="ipadapter-demo", help="output folder (default: ipadapter-demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="measure an adapter: CLIP-I/CLIP-T (paper protocol), tiny-world CP/PF, faces")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("clip", help="the paper's Table 1 protocol: CLIP-I and CLIP-T over (image, caption) pairs")
    e.add_argument("--data", help="pairs: JSON list, JSONL, folder with .txt captions, or tinyworld:N:SEED (default)")
    e.add_argument("--image-root", help="folder the JSON's image_file entries are relative to")
    e.add_argument("--base", help="diffusers folder, single file or hub id (default: tinyworld)")
    e.add_argument("--base-config", help="with a single-file --base: the diffusers folder or hub id of its configs")
    e.add_argument("--adapter", help="IP-Adapter file (default: tinyworld-base)")
    e.add_argument("--image-encoder", help="the adapter's image encoder (default: the base's image_encoder/)")
    e.add_argument("--clip", help="scoring CLIP with both towers, e.g. openai/clip-vit-large-patch14 (default: "
                                  "tinyworld, with the tiny-world base only)")  # fmt: skip
    e.add_argument("--scale", type=float, help="adapter scale (default: 1.0)")
    e.add_argument("--preset", help="per-block preset (style, composition, ...)")
    e.add_argument("--images-per-pair", type=int, help="generated images per pair (default: 4, as the paper)")
    e.add_argument("--with-text", action="store_true", default=None, help="also prompt with the caption")
    e.add_argument("--scheduler", help="ddim (default: the paper's sampler, from the base's scheduler config) or "
                                       "pipeline (the scheduler saved with the base)")  # fmt: skip
    e.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    e.add_argument("--guidance", type=float, help="classifier-free guidance (default: the pipeline's)")
    e.add_argument("--seed", type=int, help="pair i uses seed + i (default: 0)")
    e.add_argument("--limit", type=int, help="only the first N pairs")
    e.add_argument("--save-images", action="store_true", default=None, help="also write the generated images")
    e.add_argument("--out", help="output folder: results.rank*.jsonl, summary.json, summary.md (default: eval-clip)")
    e.add_argument("--device", help="torch device (default: cpu)")
    e.add_argument("--dtype", help="weights dtype of the generating models: float32 (default), float16, bfloat16; "
                   "the scoring CLIP stays float32")
    e.add_argument("--compile", help="torch.compile the UNet with this backend (e.g. inductor): one graph serves "
                   "every pair; pays on GPUs for long evaluations")  # fmt: skip
    e.set_defaults(func=cmd_eval_clip)
    e = esub.add_parser("tinyworld", help="concept preservation (CP), prompt following (PF) and CP x PF")
    e.add_argument("--adapter", default="tinyworld-base", help="tinyworld-base, tinyworld-plus or an adapter file")
    e.add_argument("--protocol", nargs="+", default=["text", "image", "image+text"], choices=["text", "image", "image+text"])
    e.add_argument("--scale", nargs="+", type=float, default=[1.0], help="adapter scale(s) (default: 1.0)")
    e.add_argument("--preset", default=None, help="per-block preset (style, composition, ...)")
    e.add_argument("--n", type=int, default=200, help="unseen-render scenes per row (default: 200)")
    e.add_argument("--seed", type=int, default=4242, help="scenes and noise seed (default: 4242)")
    e.add_argument("--steps", type=int, default=25, help="DDIM steps (default: 25)")
    e.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (default: 4.0)")
    e.add_argument("--out", default="", help="also write the Markdown table here")
    e.set_defaults(func=cmd_eval_tinyworld)
    e = esub.add_parser("face", help="FaceID: ArcFace identity similarity, optional FID and LPIPS")
    e.add_argument("--reference", required=True, help="the reference face image")
    e.add_argument("--generated", nargs="+", required=True, help="generated images")
    e.add_argument("--insightface-model", default="buffalo_l", help="insightface model pack (default: buffalo_l)")
    e.add_argument("--insightface-root", default=None, help="insightface root holding models/<pack> (default: ~/.insightface)")
    e.add_argument("--no-identity", action="store_true", help="skip the identity similarity")
    e.add_argument("--fid-real", nargs="+", help="real images for FID against the generated set")
    e.add_argument("--lpips", action="store_true", help="LPIPS of each generated image to the reference")
    e.set_defaults(func=cmd_eval_face)

    sub.add_parser("train", help="train an adapter (see `ipadapter train --help`)", add_help=False)
    return parser


# the flags that name models, which may be hub ids (named in the error when the hub cannot be reached)
MODEL_FLAGS = {"base", "base_config", "image_encoder", "controlnet", "t2i_adapter", "clip", "content_text_encoder"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # training has its own parser (one flag per TrainConfig field)
        from .training.loop import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as e:  # OSError: missing files, and hub ids that cannot be fetched
        from .sources import error_line

        models = {f"--{k.replace('_', '-')}": v for k, v in vars(args).items() if k in MODEL_FLAGS and isinstance(v, str)}
        print(f"error: {error_line(e, models)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written is complete (eval clip resumes when rerun)
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
