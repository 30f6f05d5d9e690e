"""Inference overhead of the image prompt: seconds per denoising step (one CFG UNet call), side by side in one run.

    python benchmarks/inference_overhead.py [--models tinyworld,sd15] [--seconds 60] [--min-rounds 5] [--calls 1]

For each model: the plain UNet, the UNet with our adapter (image keys/values cached across steps), the same with
every layer's image attention through SDPA (what narrow layers do instead: `attention.SMALL_LAYER_WIDTH`), and the
same UNet with diffusers' built-in IP-Adapter loaded from the same official-layout weights. Each round times every
configuration once (`--calls` calls each, the order rotating from round to round), so that machine noise hits them
alike; rounds repeat for `--seconds` per model. Reported: the median over rounds of the per-call time, and of each
round's overhead ratio, with the interquartile range of those ratios in brackets (how much the machine moved).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def load_model(name: str):
    """(unet, latent size, image embed dim) for 'tinyworld' or 'sd15' (real SD1.5 config, random weights)."""
    from diffusers import UNet2DConditionModel

    if name == "tinyworld":
        from ipadapter.sources import resolve_base

        return UNet2DConditionModel.from_pretrained(resolve_base("tinyworld"), subfolder="unet").eval(), 16, 64
    if name == "sd15":
        from tiny_models import reference_json

        cfg = {k: v for k, v in reference_json("sd15/unet_config.json").items() if not k.startswith("_")}
        torch.manual_seed(0)
        return UNet2DConditionModel(**cfg).eval(), 32, 1024  # 256x256 images
    raise ValueError(f"unknown model {name!r}; expected tinyworld or sd15")


def time_calls(fn, calls: int) -> float:
    """Mean seconds per call over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


@torch.no_grad()
def bench(name: str, seconds: float, min_rounds: int, calls: int) -> dict[str, list[float]]:
    """Per-round seconds per call of each configuration."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ipadapter import IPAdapter

    unet, size, embed_dim = load_model(name)
    cross = unet.config.cross_attention_dim
    theirs = copy.deepcopy(unet)
    torch.manual_seed(1)
    adapter = IPAdapter.for_unet(unet, "base", image_embed_dim=embed_dim)
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(Path(tmp) / "ip.safetensors", layout="official")
        pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=theirs, scheduler=DDIMScheduler(),
                                       safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
        pipe.load_ip_adapter(tmp, subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size, size, generator=g)  # a CFG batch
    text = torch.randn(2, 77, cross, generator=g)
    embeds = torch.randn(2, 1, embed_dim, generator=g)
    t = torch.tensor(500)

    plain = copy.deepcopy(unet)
    adapter.attach(unet)
    tokens = adapter.project(image=embeds[:, 0])
    adapter.set_tokens(tokens[1:], uncond=tokens[:1])
    from ipadapter import attention

    def sdpa_only():  # our adapter with every layer's image attention through SDPA (no small-layer path)
        width, attention.SMALL_LAYER_WIDTH = attention.SMALL_LAYER_WIDTH, 0
        try:
            return unet(latents, t, text)
        finally:
            attention.SMALL_LAYER_WIDTH = width

    runs = {
        "plain UNet": lambda: plain(latents, t, text),
        "ipadapter": lambda: unet(latents, t, text),
        "ipadapter, SDPA only": sdpa_only,
        "diffusers IP-Adapter": lambda: theirs(latents, t, text, added_cond_kwargs={"image_embeds": [embeds]}),
    }
    for fn in runs.values():  # warm-up (and fills our key/value cache, as the first denoising step does)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    start = time.perf_counter()
    while len(times["plain UNet"]) < min_rounds or time.perf_counter() - start < seconds:
        shift = len(times["plain UNet"]) % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(time_calls(runs[key], calls))
    return times


def overhead(times: dict[str, list[float]], key: str) -> str:
    """Median over rounds of (key / plain - 1), with the interquartile range: '+1.2% [+0.8, +1.6]'."""
    ratios = [100 * (t / base - 1) for t, base in zip(times[key], times["plain UNet"])]
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return f"{q2:+.1f}% [{q1:+.1f}, {q3:+.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tinyworld,sd15", help="comma-separated: tinyworld, sd15")
    parser.add_argument("--seconds", type=float, default=60, help="time spent on each model's rounds")
    parser.add_argument("--min-rounds", type=int, default=5, help="rounds at least, however long they take")
    parser.add_argument("--calls", type=int, default=1, help="timed UNet calls per configuration and round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median seconds per CFG UNet call; overheads:"
          " median of the rounds' ratios [interquartile range]")
    print("| model | rounds | plain UNet | ipadapter | diffusers IP-Adapter | ipadapter overhead | diffusers overhead | "
          "ipadapter overhead, SDPA only |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        t = bench(name.strip(), args.seconds, args.min_rounds, args.calls)
        med = {k: statistics.median(v) for k, v in t.items()}
        print(f"| {name} | {len(t['plain UNet'])} | {med['plain UNet']:.4f} | {med['ipadapter']:.4f} | "
              f"{med['diffusers IP-Adapter']:.4f} | {overhead(t, 'ipadapter')} | {overhead(t, 'diffusers IP-Adapter')} | "
              f"{overhead(t, 'ipadapter, SDPA only')} |",
              flush=True)


if __name__ == "__main__":
    main()
