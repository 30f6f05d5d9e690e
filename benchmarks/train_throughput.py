"""Training throughput: our trainer (embedding cache) vs a loop written like the official tutorial_train.py.

Both train the same adapter on the same model and data with the same batch size, in one run; the official-style loop
decodes images and runs the VAE, text encoder and image encoder on every step, ours reads the cache. Prints
samples/s of each and the ratio.

    python benchmarks/train_throughput.py [--base tinyworld] [--samples 256] [--batch-size 16] [--steps 30]
    python benchmarks/train_throughput.py --proportions sd15 --resolution 256 --samples 16 --batch-size 2 --steps 4

`--proportions sd15` times SD1.5 + ViT-H/14 with their real depths and half their widths (random weights; see
`tests/tiny_models.make_proportional_sd15`), so the frozen models' share of a step is the real one. On the tiny
world the UNet dwarfs its tiny VAE and encoders, which bounds what any cache can save there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def official_style(cfg, steps: int) -> float:
    """samples/s of a tutorial_train.py-style loop: every frozen model runs every step, no cache."""
    from ipadapter import IPAdapter
    from ipadapter.training.data import TrainDataset, collate, read_records
    from ipadapter.training.models import load_frozen_models, tokenize_fn

    models = load_frozen_models(cfg.base, cfg.image_encoder, True)
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(models.unet, "base", image_embed_dim=models.image_encoder.pooled_dim).attach(models.unet)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-4, weight_decay=0.01)
    tokenize = tokenize_fn(models.tokenizers)
    dataset = TrainDataset(read_records(cfg.data), cfg.resolution, models.image_encoder.processor, tokenize)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
    scheduler, sf = models.noise_scheduler, models.vae.config.scaling_factor
    done, started = 0, None
    while done < steps + 2:
        for batch in loader:
            if done == 2:
                started, seen = time.perf_counter(), 0  # two warm-up steps
            with torch.no_grad():
                latents = models.vae.encode(batch["pixels"]).latent_dist.sample() * sf
                image_embeds = models.image_encoder.model(batch["clip_pixels"]).image_embeds
                drop = torch.rand(len(image_embeds)) < 0.05
                image_embeds = torch.where(drop[:, None], torch.zeros_like(image_embeds), image_embeds)
                text = models.text_encoders[0](batch["input_ids"][0])[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),))
            noisy = scheduler.add_noise(latents, noise, t)
            adapter.set_tokens(adapter.project(image=image_embeds))
            loss = F.mse_loss(models.unet(noisy, t, text).sample.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            done += 1
            if started is not None:
                seen += len(latents)
            if done >= steps + 2:
                break
    return seen / (time.perf_counter() - started)


def ours(cfg) -> tuple[float, float]:
    """(samples/s of training steps, seconds spent building the cache once)."""
    from ipadapter.training import Trainer

    trainer = Trainer(cfg, show_progress=False)
    started = time.perf_counter()
    trainer.run()
    total = time.perf_counter() - started
    return trainer.samples_per_second, total - trainer.loop_seconds


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
                        help="instead of --base: SD1.5 + ViT-H at real depths, half widths (random weights)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from tiny_models import make_proportional_sd15, make_world_folder

    from ipadapter.training import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = make_world_folder(Path(tmp) / "data", args.samples, seed=1, size=args.resolution)
        if args.proportions == "sd15":
            args.base, args.image_encoder = make_proportional_sd15(Path(tmp) / "models", 0.5, args.resolution)
        cfg = TrainConfig(base=args.base, image_encoder=args.image_encoder, data=data, resolution=args.resolution,
                          batch_size=args.batch_size, max_steps=args.steps + 2, save_every=10**9,
                          cache_embeddings=True, output=str(Path(tmp) / "run"), log_every=1)
        baseline = official_style(cfg, args.steps)
        cached, cache_seconds = ours(cfg)
    print(f"model: {'SD1.5 + ViT-H proportions (half widths)' if args.proportions else args.base}, {args.samples} images at {args.resolution}px, batch {args.batch_size}, "
          f"{args.steps} timed steps, torch threads {torch.get_num_threads()}")
    print(f"{'loop':<44}{'samples/s':>10}")
    print(f"{'official-style (encoders every step, no cache)':<44}{baseline:>10.1f}")
    print(f"{'ipadapter train --cache-embeddings':<44}{cached:>10.1f}")
    print(f"ratio (ours / official-style): {cached / baseline:.2f}x   (one-time cache build: {cache_seconds:.1f} s)")


if __name__ == "__main__":
    main()
