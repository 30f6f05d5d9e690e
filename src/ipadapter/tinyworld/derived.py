"""Models derived from the shipped tiny world, for the paper's claims about where an adapter can be used:

- `finetune`: the tiny world's UNet fine-tuned on a sub-world (e.g. only striped shapes), the way community models
  are fine-tuned from SD1.5 on a style; an adapter trained on the base must keep working on it unchanged.
- `controlnet`: a ControlNet trained on the frozen tiny world to follow a structural condition (the shape's
  silhouette: where it is, what outline, how large), to be combined with an image prompt that sets appearance.

Both train on freshly rendered scenes with the same caption statistics as the base UNet, save complete diffusers
folders, and are deterministic for a seed.

    python -m ipadapter.tinyworld.derived finetune --restrict pattern=striped --steps 1500 --out runs/tw-striped
    python -m ipadapter.tinyworld.derived controlnet --steps 3000 --out runs/tw-controlnet
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..files import fix_modes
from .world import ATTRIBUTES, Scene, caption, render, sample_scene

logger = logging.getLogger("ipadapter.tinyworld.derived")


def silhouette(scene: Scene, seed: int | None = None, size: int = 64) -> Image.Image:
    """The ControlNet condition: the scene's shape in white on black (position, outline, size; no colour/pattern).

    Drawn as a solid yellow shape on black (same geometry and jitter as the scene), then the brightest channel."""
    drawn = render(dataclasses.replace(scene, color="yellow", background="black", pattern="solid"), size, seed=seed)
    brightest = np.asarray(drawn, dtype=np.float32).max(-1)  # (H, W)
    return Image.fromarray((brightest / max(brightest.max(), 1.0) * 255).round().astype(np.uint8)).convert("RGB")


def _parse_restrict(items: Sequence[str]) -> dict[str, str]:
    restrict = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in ATTRIBUTES or value not in ATTRIBUTES[name]:
            raise ValueError(f"--restrict takes attribute=value with values from {ATTRIBUTES}; found {item!r}")
        restrict[name] = value
    return restrict


def render_scenes(n: int, seed: int, restrict: dict[str, str] | None = None) -> list[tuple[Scene, int]]:
    """n (scene, render seed) pairs; `restrict` fixes attributes (a sub-world)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = dataclasses.replace(sample_scene(rng), **(restrict or {}))
        out.append((scene, rng.getrandbits(32)))
    return out


def _captions(scenes: Sequence[Scene], rng: random.Random, dropout: float = 0.1) -> list[str]:
    """Random-subset captions (each attribute stated with p 0.5, all with p 0.3), empty with p `dropout`."""
    texts = []
    for scene in scenes:
        if rng.random() < dropout:
            texts.append("")
            continue
        stated = list(ATTRIBUTES) if rng.random() < 0.3 else [a for a in ATTRIBUTES if rng.random() < 0.5]
        texts.append(caption(scene, stated))
    return texts


def _pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images -> (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1


def _train(model, loss_fn, steps: int, lr: float, log_every: int = 100, ema_decay: float = 0.999):
    """AdamW with warm-up + cosine decay and EMA; returns (EMA state dict, seconds, final loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    warmup = max(1, min(100, steps // 10))
    started, running, count = time.time(), 0.0, 0
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr * max(float(scale), 0.05)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.float(), alpha=1 - decay)
        running, count = running + float(loss.detach()), count + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            logger.info("step %d/%d  loss %.4f  %.2fs/step", step + 1, steps, running / count,
                        (time.time() - started) / (step + 1))  # fmt: skip
            running, count = 0.0, 0
    return ema, time.time() - started, float(loss.detach())


def _load_parts(base: str):
    from diffusers import StableDiffusionPipeline

    from ..sources import diffusers_dtype, resolve_base

    pipe = StableDiffusionPipeline.from_pretrained(resolve_base(base), **diffusers_dtype(torch.float32))
    pipe.text_encoder.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    return pipe


def _batch(pipe, items, rng: random.Random, generator: torch.Generator, condition: bool = False):
    """(noisy latents, timesteps, eps, text context[, condition pixels]) for rendered (scene, seed) items."""
    scenes = [s for s, _ in items]
    images = [render(s, seed=seed) for s, seed in items]
    with torch.no_grad():
        posterior = pipe.vae.encode(_pixels(images)).latent_dist
        latents = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)) \
            * pipe.vae.config.scaling_factor  # fmt: skip
        ids = pipe.tokenizer(_captions(scenes, rng), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids  # fmt: skip
        context = pipe.text_encoder(input_ids=ids).last_hidden_state
    eps = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(items),), generator=generator)
    alphas = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * eps
    cond = (_pixels([silhouette(s, seed) for s, seed in items]) + 1) / 2 if condition else None  # [0, 1] like diffusers
    return noisy, t, eps, context, cond


def _check_run(out: str | Path, record: str, steps: int, batch_size: int, base: str | None = None) -> Path:
    """Before any training: `out` is new, empty or a previous output of this command (it holds `record`), and not
    the base model's folder; steps and batch size are positive. Returns the staging folder the result is written to
    (moved onto `out` once complete, so nothing is lost if the run stops)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"expected --steps and --batch-size >= 1, found {steps} and {batch_size}")
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out must be a folder to write, found a file: {out}")
        if any(out.iterdir()) and not (out / record).is_file():
            raise ValueError(f"--out {out} already holds files that this command did not write (no {record}): give a "
                             "new folder; a previous output of this command is replaced")  # fmt: skip
    if base is not None:
        from ..sources import resolve_base

        base_path = Path(resolve_base(base))
        if base_path.exists() and base_path.resolve() == out.resolve():
            raise ValueError(f"--out {out} is the base model's folder: give a new folder")
    return out.parent / f".{out.name}.partial"


def _publish(staging: Path, out: Path) -> None:
    """Replaces `out` (a previous output, checked by `_check_run`) by the complete `staging` folder."""
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def finetune(base: str, out: str | Path, restrict: dict[str, str], steps: int = 1500, batch_size: int = 32,
             lr: float = 1e-4, num_scenes: int = 4000, seed: int = 0) -> Path:  # fmt: skip
    """Fine-tunes the UNet of `base` on the sub-world `restrict`; writes a complete pipeline folder to `out`."""
    staging = _check_run(out, "finetune.json", steps, batch_size, base)
    pipe = _load_parts(base)
    unet = pipe.unet.train()
    items = render_scenes(num_scenes, seed, restrict)
    rng, generator = random.Random(seed + 1), torch.Generator().manual_seed(seed + 2)

    def loss_fn(step: int) -> torch.Tensor:
        chunk = [items[i] for i in torch.randint(0, len(items), (batch_size,), generator=generator).tolist()]
        noisy, t, eps, context, _ = _batch(pipe, chunk, rng, generator)
        return F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, eps)

    ema, seconds, loss = _train(unet, loss_fn, steps, lr)
    unet.load_state_dict(ema)
    out = Path(out)
    if staging.exists():
        shutil.rmtree(staging)  # an earlier run's incomplete result
    pipe.unet = unet.eval()
    pipe.save_pretrained(str(staging))
    from ..sources import resolve_base, resolve_image_encoder

    encoder = resolve_image_encoder(base)
    if encoder and not (staging / "image_encoder").exists():
        shutil.copytree(encoder, staging / "image_encoder")
    info = {"base": resolve_base(base), "restrict": restrict, "steps": steps, "batch_size": batch_size, "lr": lr,
            "num_scenes": num_scenes, "seed": seed, "seconds": seconds, "final_loss": loss}  # fmt: skip
    (staging / "finetune.json").write_text(json.dumps(info, indent=2))
    fix_modes(staging)
    _publish(staging, out)
    return out


def controlnet(base: str, out: str | Path, steps: int = 3000, batch_size: int = 32, lr: float = 5e-4,
               num_scenes: int = 8000, seed: int = 0) -> Path:  # fmt: skip
    """Trains a ControlNet on the frozen `base` to follow the silhouette condition; saves it to `out`."""
    from diffusers import ControlNetModel

    staging = _check_run(out, "controlnet_training.json", steps, batch_size)
    pipe = _load_parts(base)
    pipe.unet.requires_grad_(False)
    factor = pipe.vae_scale_factor  # 4 for the tiny world: two stride-2 convs in the conditioning embedding
    channels = tuple(16 * 2**i for i in range(int(np.log2(factor)) + 1))
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=channels).train()
    items = render_scenes(num_scenes, seed + 10)
    rng, generator = random.Random(seed + 11), torch.Generator().manual_seed(seed + 12)

    def loss_fn(step: int) -> torch.Tensor:
        chunk = [items[i] for i in torch.randint(0, len(items), (batch_size,), generator=generator).tolist()]
        noisy, t, eps, context, cond = _batch(pipe, chunk, rng, generator, condition=True)
        down, mid = net(noisy, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        prediction = pipe.unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                               mid_block_additional_residual=mid).sample  # fmt: skip
        return F.mse_loss(prediction, eps)

    ema, seconds, loss = _train(net, loss_fn, steps, lr)
    net.load_state_dict(ema)
    out = Path(out)
    if staging.exists():
        shutil.rmtree(staging)
    net.eval().save_pretrained(str(staging))
    info = {"base": base, "condition": "silhouette", "steps": steps, "batch_size": batch_size, "lr": lr,
            "num_scenes": num_scenes, "seed": seed, "seconds": seconds, "final_loss": loss}  # fmt: skip
    (staging / "controlnet_training.json").write_text(json.dumps(info, indent=2))
    fix_modes(staging)
    _publish(staging, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="models derived from the tiny world (fine-tune, ControlNet)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="fine-tune the UNet on a sub-world")
    p.add_argument("--restrict", nargs="+", default=["pattern=striped"], help="attribute=value (default: pattern=striped)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--base", default="tinyworld")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("controlnet", help="train a silhouette ControlNet on the frozen tiny world")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--base", default="tinyworld")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        if getattr(args, "threads", 0) < 0:
            raise ValueError(f"expected --threads >= 0 (0: torch's default), found {args.threads}")
        if getattr(args, "threads", 0):
            torch.set_num_threads(args.threads)
        if args.command == "finetune":
            path = finetune(args.base, args.out, _parse_restrict(args.restrict), args.steps, args.batch_size,
                            args.lr, seed=args.seed)  # fmt: skip
        else:
            path = controlnet(args.base, args.out, args.steps, args.batch_size, args.lr, seed=args.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
