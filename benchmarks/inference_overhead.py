"""Inference overhead of the image prompt: seconds per denoising step (one CFG UNet call), side by side in one run.

    python benchmarks/inference_overhead.py [--models tinyworld,sd15] [--rounds 3] [--calls 4]

For each model: the plain UNet, the UNet with our adapter (image keys/values cached across steps), the same with
every layer's image attention through SDPA (what narrow layers do instead: `attention.SMALL_LAYER_WIDTH`), and the
same UNet with diffusers' built-in IP-Adapter loaded from the same official-layout weights. Rounds interleave the three so
that machine noise hits them alike; the median per-call time is reported with the overhead ratios.
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


def time_calls(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


@torch.no_grad()
def bench(name: str, rounds: int, calls: int) -> dict[str, float]:
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
    for _ in range(rounds):
        for key, fn in runs.items():
            times[key].extend(time_calls(fn, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tinyworld,sd15", help="comma-separated: tinyworld, sd15")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=4, help="timed UNet calls per configuration and round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median seconds per CFG UNet call")
    print("| model | plain UNet | ipadapter | diffusers IP-Adapter | ipadapter overhead | diffusers overhead | "
          "ipadapter overhead, SDPA only |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        r = bench(name.strip(), args.rounds, args.calls)
        base = r["plain UNet"]
        print(f"| {name} | {base:.4f} | {r['ipadapter']:.4f} | {r['diffusers IP-Adapter']:.4f} | "
              f"{100 * (r['ipadapter'] / base - 1):+.1f}% | {100 * (r['diffusers IP-Adapter'] / base - 1):+.1f}% | "
              f"{100 * (r['ipadapter, SDPA only'] / base - 1):+.1f}% |",
              flush=True)


if __name__ == "__main__":
    main()
