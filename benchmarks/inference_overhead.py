"""Inference overhead of the image prompt: seconds per denoising step (one CFG UNet call), side by side in one run.

    python benchmarks/inference_overhead.py [--models tinyworld,sd15] [--seconds 60] [--steps tinyworld=25,sd15=4]
    python benchmarks/inference_overhead.py --models sd15 --device cuda --dtype float16 --sd15-resolution 512

For each model: the plain UNet, the UNet with our adapter (image keys/values cached across steps), the same with
every layer's image attention through SDPA (what narrow layers do instead: `attention.SMALL_LAYER_WIDTH`), and the
same UNet with diffusers' built-in IP-Adapter loaded from the same official-layout weights. Two tables: seconds per
denoising step of whole diffusers generations (what the user waits for: the scheduler and guidance included, and
each adapter's once-per-generation work: ours projects the image prompt and rebuilds its cache, diffusers' projects
it at every step), and seconds per UNet call (the adapter's cost alone, the stricter ratio).

Each round times every configuration once (the order rotating from round to round) so that machine noise hits them
alike; rounds repeat for `--seconds` per model and table. Reported: the median over rounds of the time, and of each
round's overhead ratio, with the interquartile range of those ratios in brackets (how much the machine moved), and
under each table the target's verdict from 95% confidence intervals of the medians (how precisely the rounds fix
them): a target is met only when the whole interval is on its side.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def load_model(name: str, sd15_resolution: int = 256):
    """(unet, latent size, image embed dim, text tokens) for 'tinyworld' or 'sd15' (real SD1.5 config, random
    weights, images of `sd15_resolution` pixels); text tokens: the length of the model's prompt embeddings (its
    tokenizer's model_max_length)."""
    from diffusers import UNet2DConditionModel

    if name == "tinyworld":
        import json

        from ipadapter.sources import resolve_base

        folder = Path(resolve_base("tinyworld"))
        tokens = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]  # 16
        return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(), 16, 64, tokens
    if name == "sd15":
        from tiny_models import reference_json

        cfg = {k: v for k, v in reference_json("sd15/unet_config.json").items() if not k.startswith("_")}
        torch.manual_seed(0)
        return UNet2DConditionModel(**cfg).eval(), sd15_resolution // 8, 1024, 77
    raise ValueError(f"unknown model {name!r}; expected tinyworld or sd15")


def synchronize() -> None:
    """Waits for queued GPU work (a CUDA call returns before its kernels finish)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn, calls: int) -> float:
    """Mean seconds per call over `calls` calls, queued device work included."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - start) / calls


def rounds(runs: dict, seconds: float, min_rounds: int, calls: int, warm: bool) -> dict[str, list[float]]:
    """Per-round seconds per call of each of `runs`, the order rotating from round to round. `warm`: one untimed
    call before each configuration's timed ones, so that each starts with its own weights in the CPU caches, as
    the steps of a generation do (the configurations are separate UNet copies)."""
    for fn in runs.values():  # warm-up (and fills our key/value cache, as the first denoising step does)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    keys = list(runs)
    start = time.perf_counter()
    while len(times[keys[0]]) < min_rounds or time.perf_counter() - start < seconds:
        shift = len(times[keys[0]]) % len(keys)
        for key in keys[shift:] + keys[:shift]:
            if warm:
                runs[key]()
            times[key].append(time_calls(runs[key], calls))
    return times


@torch.no_grad()
def bench(name: str, seconds: float, min_rounds: int, calls: int, steps: int, device: str = "cpu",
          dtype: torch.dtype = torch.float32, sd15_resolution: int = 256) -> dict[str, dict[str, list[float]]]:
    """{"pipeline": per-round seconds per denoising step of whole generations, "unet": per-round seconds per UNet
    call}, for each configuration; every model and input on `device` in `dtype`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ipadapter import IPAdapter

    unet, size, embed_dim, text_tokens = load_model(name, sd15_resolution)
    unet.to(device, dtype)
    cross = unet.config.cross_attention_dim
    theirs = copy.deepcopy(unet)
    plain = copy.deepcopy(unet)
    sdpa_unet = copy.deepcopy(unet)  # ours again, every layer's image attention through SDPA
    torch.manual_seed(1)
    adapter = IPAdapter.for_unet(unet, "base", image_embed_dim=embed_dim)
    adapter.to(device, dtype)
    sdpa_adapter = copy.deepcopy(adapter)

    def pipeline(u):
        pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=u, scheduler=DDIMScheduler(),
                                       safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipes = {"plain UNet": pipeline(plain), "ipadapter": pipeline(unet), "ipadapter, SDPA only": pipeline(sdpa_unet),
             "diffusers IP-Adapter": pipeline(theirs)}
    with tempfile.TemporaryDirectory() as tmp:
        adapter.save(Path(tmp) / "ip.safetensors", layout="official")
        pipes["diffusers IP-Adapter"].load_ip_adapter(tmp, subfolder="", weight_name="ip.safetensors",
                                                      image_encoder_folder=None)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size, size, generator=g).to(device, dtype)  # a CFG batch
    text = torch.randn(2, text_tokens, cross, generator=g).to(device, dtype)  # [negative, positive] prompt embeddings
    embeds = torch.randn(2, 1, embed_dim, generator=g).to(device, dtype)  # [unconditional, reference] image embeddings
    t = torch.tensor(500, device=device)
    adapter.attach(unet)
    sdpa_adapter.attach(sdpa_unet)
    from ipadapter import attention

    def set_image_prompt(a) -> None:  # what a generation with our adapter does once (clears the key/value cache)
        tokens = a.project(image=embeds[:, 0])
        a.set_tokens(tokens[1:], uncond=tokens[:1])

    def sdpa_only(fn):  # the layers' plans are made during the call with the small-layer path off (then kept)
        def run():
            width, attention.SMALL_LAYER_WIDTH = attention.SMALL_LAYER_WIDTH, 0
            try:
                return fn()
            finally:
                attention.SMALL_LAYER_WIDTH = width
        return run

    def generate(key: str, **extra):
        def run():
            if key == "ipadapter":
                set_image_prompt(adapter)
            elif key == "ipadapter, SDPA only":
                set_image_prompt(sdpa_adapter)
            pipes[key](prompt_embeds=text[1:], negative_prompt_embeds=text[:1], latents=latents[:1].clone(),
                       height=8 * size, width=8 * size, num_inference_steps=steps, output_type="latent", **extra)
        return run

    set_image_prompt(adapter)
    set_image_prompt(sdpa_adapter)
    unet_runs = {
        "plain UNet": lambda: plain(latents, t, text),
        "ipadapter": lambda: unet(latents, t, text),
        "ipadapter, SDPA only": sdpa_only(lambda: sdpa_unet(latents, t, text)),
        "diffusers IP-Adapter": lambda: theirs(latents, t, text, added_cond_kwargs={"image_embeds": [embeds]}),
    }
    pipeline_runs = {
        "plain UNet": generate("plain UNet"),
        "ipadapter": generate("ipadapter"),
        "ipadapter, SDPA only": sdpa_only(generate("ipadapter, SDPA only")),
        "diffusers IP-Adapter": generate("diffusers IP-Adapter", ip_adapter_image_embeds=[embeds]),
    }
    per_step = rounds(pipeline_runs, seconds, min_rounds, 1, warm=False)  # a generation warms up in its first step
    return {"pipeline": {k: [x / steps for x in v] for k, v in per_step.items()},
            "unet": rounds(unet_runs, seconds, min_rounds, calls, warm=True)}


def percents(times: dict[str, list[float]], key: str) -> list[float]:
    """Each round's overhead of `key` over the plain UNet, in percent."""
    return [100 * (t / base - 1) for t, base in zip(times[key], times["plain UNet"])]


def overhead(times: dict[str, list[float]], key: str) -> str:
    """Median over rounds of (key / plain - 1), with the interquartile range: '+1.2% [+0.8, +1.6]'."""
    q1, q2, q3 = statistics.quantiles(percents(times, key), n=4, method="inclusive")  # within the rounds
    return f"{q2:+.1f}% [{q1:+.1f}, {q3:+.1f}]"


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: the order statistics x_(j) <= x_(n+1-j) with the largest
    j whose interval covers the median with probability >= `level` (the count of rounds below the median is
    Binomial(n, 1/2)). None when n is too small for that level (n < 6 at 95%)."""
    x, n = sorted(values), len(values)
    below = 0.0  # P(B <= j - 1) for B ~ Binomial(n, 1/2)
    best = None
    for j in range(1, n // 2 + 1):
        below += math.comb(n, j - 1) / 2**n
        if 1 - 2 * below < level:
            break
        best = (x[j - 1], x[n - j])
    return best


def verdict(times: dict[str, list[float]], target: float = 2.0) -> str:
    """Whether ours is <= `target` percent and below diffusers', decided by 95% intervals of the medians: of our
    overhead, and of the per-round difference between ours and diffusers' (paired: the same round's plain UNet)."""
    ours = median_interval(percents(times, "ipadapter"))
    diff = median_interval([a - b for a, b in zip(percents(times, "ipadapter"), percents(times, "diffusers IP-Adapter"))])
    if ours is None or diff is None:
        return "too few rounds for 95% intervals"

    def decide(interval, bound) -> str:
        return "yes" if interval[1] <= bound else "no" if interval[0] > bound else "undecided"

    return (f"ours <= {target:g}%: {decide(ours, target)} (95% interval of the median {ours[0]:+.1f}, {ours[1]:+.1f}); "
            f"below diffusers': {decide(diff, 0.0)} (ours minus diffusers' {diff[0]:+.1f}, {diff[1]:+.1f} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tinyworld,sd15", help="comma-separated: tinyworld, sd15")
    parser.add_argument("--seconds", type=float, default=60, help="time spent on each model's rounds, per table")
    parser.add_argument("--min-rounds", type=int, default=5, help="rounds at least, however long they take")
    parser.add_argument("--calls", type=int, default=2, help="timed UNet calls per configuration and round")
    parser.add_argument("--steps", default="tinyworld=25,sd15=4",
                        help="denoising steps of the timed generations, per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sd15-resolution", type=int, default=256, help="image size of the sd15 model's runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = dict(item.split("=") for item in args.steps.split(","))
    results = {}
    for name in args.models.split(","):
        name = name.strip()
        results[name] = bench(name, args.seconds, args.min_rounds, args.calls, int(steps.get(name, 4)), args.device,
                              getattr(torch, args.dtype), args.sd15_resolution)  # fmt: skip
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {args.dtype}, sd15 at {args.sd15_resolution}px; medians over rounds; "
          "overheads: median of the rounds' ratios [interquartile range]")
    for table, title in (("pipeline", "seconds per denoising step (whole generations: DDIM, guidance 7.5, prompt "
                                      "and image embeddings given, latents out; ours sets its image prompt in each)"),
                         ("unet", "seconds per UNet call (one CFG batch)")):
        print(f"\n{title}\n")
        print("| model | rounds | plain | ipadapter | diffusers IP-Adapter | ipadapter overhead | diffusers overhead | "
              "ipadapter overhead, SDPA only |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            t = r[table]
            med = {k: statistics.median(v) for k, v in t.items()}
            label = f"{name} ({steps.get(name, 4)} steps)" if table == "pipeline" else name
            print(f"| {label} | {len(t['plain UNet'])} | {med['plain UNet']:.4f} | {med['ipadapter']:.4f} | "
                  f"{med['diffusers IP-Adapter']:.4f} | {overhead(t, 'ipadapter')} | "
                  f"{overhead(t, 'diffusers IP-Adapter')} | {overhead(t, 'ipadapter, SDPA only')} |")
        print()
        for name, r in results.items():
            print(f"target, {name}: {verdict(r[table])}")


if __name__ == "__main__":
    main()
