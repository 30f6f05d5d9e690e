"""Training throughput: our trainer (embedding cache) vs a loop written like the official tutorial_train.py.

Both train the same adapter on the same model and data with the same batch size, in one run; the official-style loop
decodes images and runs the VAE, text encoder and image encoder on every step, ours reads the cache. Prints
samples/s of each and the ratio.

    python benchmarks/train_throughput.py [--base tinyworld] [--samples 256] [--batch-size 16] [--steps 30]
    python benchmarks/train_throughput.py --proportions sd15 --resolution 256 --samples 16 --batch-size 2 --steps 4
    python benchmarks/train_throughput.py --compile inductor   # adds a row: our trainer with --compile inductor
    python benchmarks/train_throughput.py --row channels_last=true --row compile=inductor,channels_last=true

`--proportions sd15` times SD1.5 + ViT-H/14 with their real depths and half their widths (random weights; see
`tests/tiny_models.make_proportional_sd15`), so the frozen models' share of a step is close to the real one (the text
encoder's fixed 77 tokens do not shrink with the resolution: at 256 px its share is about 4x the real one, and the
FLOP ceiling printed below is 1.98x instead of 512 px's 1.88x). On the tiny
world the UNet dwarfs its tiny VAE and encoders, which bounds what any cache can save there.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def official_style(cfg, steps: int, device: torch.device) -> float:
    """samples/s of a tutorial_train.py-style loop: every frozen model runs every step, no cache. As there, the VAE,
    text and image encoders are cast to the mixed-precision dtype while the UNet and the adapter stay float32 under
    autocast, and every step reads its loss back (`.item()`) and prints a line (here into a string buffer)."""
    from ipadapter import IPAdapter
    from ipadapter.training.data import TrainDataset, collate, read_records
    from ipadapter.training.models import load_frozen_models, tokenize_fn

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    models = load_frozen_models(cfg.base, cfg.image_encoder, True)
    models.unet.to(device, torch.float32)  # tutorial_train.py: `#unet.to(accelerator.device, dtype=weight_dtype)`
    for frozen in (models.vae, models.image_encoder.model, *models.text_encoders):
        frozen.to(device, dtype)
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(models.unet, "base", image_embed_dim=models.image_encoder.pooled_dim).attach(models.unet)
    adapter.to(device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.01)
    tokenize = tokenize_fn(models.tokenizers)
    dataset = TrainDataset(read_records(cfg.data), cfg.resolution, models.image_encoder.processor, tokenize)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                        num_workers=cfg.num_workers)  # fmt: skip
    scheduler, sf = models.noise_scheduler, models.vae.config.scaling_factor
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # tutorial_train.py runs under Accelerate, which with fp16 adds a GradScaler (as our trainer has): backward on the
    # scaled loss, and an optimizer step that unscales, reads the inf/nan flag back and updates the scale
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    done, started, seen = 0, None, 0
    log = io.StringIO()  # the tutorial prints to the terminal
    while done < steps + 2:
        for batch in loader:
            with torch.no_grad():
                pixels = batch["pixels"].to(device, dtype)
                latents = models.vae.encode(pixels).latent_dist.sample() * sf
                image_embeds = models.image_encoder.model(batch["clip_pixels"].to(device, dtype)).image_embeds
                drop = torch.rand(len(image_embeds), device=device) < 0.05
                image_embeds = torch.where(drop[:, None], torch.zeros_like(image_embeds), image_embeds)
                text = models.text_encoders[0](batch["input_ids"][0].to(device))[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            with autocast:
                adapter.set_tokens(adapter.project(image=image_embeds.float()))
                loss = F.mse_loss(models.unet(noisy, t, text).sample.float(), noise.float())
            step_loss = loss.detach().mean().item()  # there: accelerator.gather(loss.repeat(bs)).mean().item()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            print(f"step {done}, step_loss: {step_loss}", file=log)
            if started is not None:
                seen += len(latents)
            done += 1
            if done == 2:  # after two warm-up steps, before the next batch is fetched (as the trainer's clock)
                _sync(device)
                started, seen = time.perf_counter(), 0
            if done >= steps + 2:
                break
    _sync(device)
    return seen / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_sample(cfg) -> dict[str, float] | None:
    """FLOPs of one training sample in each model, counted on the meta device (shapes only, no compute): what each
    loop runs per sample, hence the most any cache can save where time follows FLOPs. None for SDXL bases."""
    from torch.utils.flop_counter import FlopCounterMode

    from ipadapter import IPAdapter
    from ipadapter.training.models import load_frozen_models

    models = load_frozen_models(cfg.base, cfg.image_encoder, True)
    if models.is_sdxl:
        return None
    unet, vae, encoder, text = models.unet, models.vae, models.image_encoder.model, models.text_encoders[0]
    for module in (unet, vae, encoder, text):
        module.to("meta")
    with torch.device("meta"):
        adapter = IPAdapter.for_unet(unet, "base", image_embed_dim=models.image_encoder.pooled_dim).attach(unet)
        side = encoder.config.image_size
        latent = cfg.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        pixels, clip = torch.randn(1, 3, cfg.resolution, cfg.resolution), torch.randn(1, 3, side, side)
        ids = torch.zeros(1, models.tokenizers[0].model_max_length, dtype=torch.long)
        noisy = torch.randn(1, unet.config.in_channels, latent, latent)
        states = torch.randn(1, ids.shape[1], unet.config.cross_attention_dim)
        embeds = torch.randn(1, models.image_encoder.pooled_dim)

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    def unet_step() -> None:  # forward and backward, as a training step runs them
        adapter.set_tokens(adapter.project(image=embeds))
        unet(noisy, torch.zeros(1, dtype=torch.long, device="meta"), states).sample.float().pow(2).mean().backward()

    with torch.no_grad():
        frozen = {"VAE encoder": count(lambda: vae.encode(pixels)), "image encoder": count(lambda: encoder(clip)),
                  "text encoder": count(lambda: text(ids))}  # fmt: skip
    return {**frozen, "UNet + adapter step": count(unet_step)}


def ours(cfg) -> tuple[float, float, float]:
    """(samples/s of training steps after two warm-up steps, seconds of set-up (loading, building the cache once),
    seconds of the two warm-up steps (where --compile compiles))."""
    from ipadapter.training import Trainer

    trainer = Trainer(cfg, show_progress=False)
    started = time.perf_counter()
    trainer.run()
    total = time.perf_counter() - started
    timed = (cfg.max_steps - 2) * cfg.batch_size / trainer.samples_per_second
    return trainer.samples_per_second, total - trainer.loop_seconds, trainer.loop_seconds - timed


def parse_row(spec: str) -> dict:
    """'compile=inductor,channels_last=true' -> TrainConfig fields, typed as the fields' defaults are."""
    from ipadapter.training import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    fields = {}
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name not in defaults or not value:
            raise SystemExit(f"--row {spec!r}: expected FIELD=VALUE pairs of TrainConfig fields, found {part!r}")
        kind = type(defaults[name])
        fields[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return fields


def row_label(fields: dict) -> str:
    flags = "".join(f" --{k.replace('_', '-')} {str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())
    return "ipadapter train --cache-embeddings" + flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="tinyworld", help="diffusers folder or 'tinyworld'")
    parser.add_argument("--image-encoder", default="", help="image encoder folder (default: the base's)")
    parser.add_argument("--samples", type=int, default=256, help="training images")
    parser.add_argument("--resolution", type=int, default=64, help="training resolution")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps for each loop")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--proportions", choices=["sd15"], default=None,
                        help="instead of --base: SD1.5 + ViT-H at real depths and --width times their widths "
                        "(random weights)")  # fmt: skip
    parser.add_argument("--width", type=float, default=0.5, help="width factor for --proportions (1.0: real size)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"],
                        help="both loops: frozen models in this dtype, adapter float32 under autocast")  # fmt: skip
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of both loops (decoding)")
    parser.add_argument("--compile", default="", help="also time our trainer with this torch.compile backend "
                        "(the same as --row compile=BACKEND)")  # fmt: skip
    parser.add_argument("--row", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE...]",
                        help="also time our trainer with these TrainConfig fields changed, e.g. channels_last=true "
                        "or compile=inductor,channels_last=true (repeatable)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="measure every loop this many times, alternating "
                        "which loop goes first, and report medians and each round's ratio (a busy machine's "
                        "drift then falls on both sides)")  # fmt: skip
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, found {args.rounds}")
    rows = ([{"compile": args.compile}] if args.compile else []) + [parse_row(spec) for spec in args.row]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where Accelerate puts our trainer
    if args.mixed_precision == "fp16" and device.type == "cpu":
        # Accelerate autocasts nothing in fp16 on a CPU: our trainer would run its UNet in float32 while this script's
        # official-style loop autocast it to fp16 (slow CPU kernels), a ratio of precisions, not of caching; and
        # tutorial_train.py itself would hand its float32 UNet fp16 inputs there
        raise SystemExit("--mixed-precision fp16 needs a GPU (on a CPU, Accelerate runs no fp16 autocast); use bf16 or no")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tiny_models import make_proportional_sd15, make_world_folder

    from ipadapter.training import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = make_world_folder(Path(tmp) / "data", args.samples, seed=1, size=args.resolution)
        if args.proportions == "sd15":
            args.base, args.image_encoder = make_proportional_sd15(Path(tmp) / "models", args.width, args.resolution)
        cfg = TrainConfig(base=args.base, image_encoder=args.image_encoder, data=data, resolution=args.resolution,
                          batch_size=args.batch_size, max_steps=args.steps + 2, save_every=10**9,
                          cache_embeddings=True, output=str(Path(tmp) / "run"),
                          mixed_precision=args.mixed_precision, num_workers=args.workers)  # fmt: skip
        baselines, caches, rates, warmups = [], [], [[] for _ in rows], [[] for _ in rows]
        for r in range(args.rounds):
            # round 0 builds the cache in run/cache (its set-up time is reported); later rounds read it
            ours_cfg = cfg if r == 0 else dataclasses.replace(cfg, output=str(Path(tmp) / f"run-r{r}"),
                                                              cache_dir=str(Path(tmp) / "run" / "cache"))  # fmt: skip
            if r % 2 == 0:
                baselines.append(official_style(cfg, args.steps, device))
                caches.append(ours(ours_cfg)[:2])
            else:
                caches.append(ours(ours_cfg)[:2])
                baselines.append(official_style(cfg, args.steps, device))
            for i, fields in enumerate(rows):
                row_cfg = dataclasses.replace(cfg, **fields, output=str(Path(tmp) / f"run-{i}-r{r}"),
                                              cache_dir=str(Path(tmp) / "run" / "cache"))  # fmt: skip
                rate, _, warmup = ours(row_cfg)
                rates[i].append(rate)
                warmups[i].append(warmup)
        baseline = statistics.median(baselines)
        cached, cache_seconds = statistics.median(rate for rate, _ in caches), caches[0][1]
        round_ratios = [c / b for (c, _), b in zip(caches, baselines)]
        timed = [(row_label(fields), statistics.median(rates[i]), warmups[i][0], fields)
                 for i, fields in enumerate(rows)]  # (label, samples/s, seconds of the first two warm-up steps, fields)
        flops = flops_per_sample(cfg)
    model = f"SD1.5 + ViT-H proportions (widths x{args.width:g})" if args.proportions else args.base
    # the official-style loop re-iterates its DataLoader at each epoch (as tutorial_train.py): with workers, new ones
    # start and decode the epoch's first batch while the GPU waits. A real dataset's epoch is thousands of steps; here
    # an epoch of samples // batch steps may end inside the timed steps (3 .. steps + 2), which our trainer (one loader
    # for the run) does not pay: say so next to the ratio
    per_epoch = args.samples // args.batch_size
    restarts = sum(1 for k in range(1, args.steps + 2) if 2 <= k * per_epoch <= args.steps + 1) if args.workers else 0
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, torch threads {torch.get_num_threads()}"
    print(f"model: {model}, {args.samples} images at {args.resolution}px, batch {args.batch_size}, {args.steps} timed "
          f"steps, mixed precision {args.mixed_precision}, {args.workers} loader workers, {where}")
    width = max([52] + [len(label) + 2 for label, *_ in timed])
    print(f"{'loop':<{width}}{'samples/s':>10}")
    print(f"{'official-style (encoders every step, no cache)':<{width}}{baseline:>10.2f}")
    print(f"{'ipadapter train --cache-embeddings':<{width}}{cached:>10.2f}")
    for label, rate, _, _ in timed:
        print(f"{label:<{width}}{rate:>10.2f}")
    print(f"ratio (ours / official-style): {cached / baseline:.2f}x   (our set-up, models loaded and the cache built "
          f"once: {cache_seconds:.1f} s)")
    if restarts:
        print(f"note: the official-style loop's epoch ({per_epoch} steps) ends {restarts} time(s) inside its timed steps "
              f"and its {args.workers} loader workers restart there (a real dataset's epochs are far longer): this "
              f"ratio overstates ours; use --samples >= {(args.steps + 2) * args.batch_size}")
    if args.rounds > 1:
        print(f"samples/s above: medians of {args.rounds} rounds; each round's ratio: "
              + ", ".join(f"{r:.2f}x" for r in round_ratios) + f" (median {statistics.median(round_ratios):.2f}x)")
    if flops is not None:
        cached_flops = flops["UNet + adapter step"]
        print("GFLOPs per sample (counted, not timed): " + ", ".join(f"{k} {v / 1e9:.3g}" for k, v in flops.items())
              + f"; FLOP ratio (official-style / cached): {sum(flops.values()) / cached_flops:.2f}x")
    for label, rate, warmup, fields in timed:
        compiling = f", compiling: {warmup:.1f} s" if fields.get("compile") else f": {warmup:.1f} s"
        print(f"ratio with{label.removeprefix('ipadapter train --cache-embeddings')}: {rate / baseline:.2f}x   "
              f"(two warm-up steps{compiling})")


if __name__ == "__main__":
    main()
