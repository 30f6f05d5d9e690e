"""Attribute reader: a small CNN that reads a tiny-world scene back from a 64x64 image.

It is the tiny world's stand-in for a perception model: metrics compare the scene it reads from a generated
image with the reference scene and with the prompt. Inputs are RGB in [0, 1] (a PIL image, or a float tensor
(N, 3, H, W); images of another size are resized to 64x64).

Retrain the shipped weights (about 7 minutes on one CPU core; prints held-out accuracy):
    python -m ipadapter.tinyworld.reader --out src/ipadapter/tinyworld/assets/reader.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from ipadapter.files import save_safetensors
from ipadapter.tinyworld.world import ATTRIBUTES, Scene, make_dataset

DEFAULT_ASSET = "reader.safetensors"  # file name of the shipped weights in ipadapter/tinyworld/assets
TRAIN_SEED = 0  # seed of the training images used for the shipped weights
HELD_OUT_SEED = 10_000  # seed of the held-out images `main` reports accuracy on; never used for training


@dataclass
class ReaderConfig:
    """Architecture of the attribute reader; stored as JSON in the weights' safetensors metadata."""

    image_size: int = 64  # input height and width; other sizes are resized to this
    channels: tuple[int, ...] = (24, 48, 64, 96, 96)  # output channels of each 3x3 conv
    strides: tuple[int, ...] = (2, 2, 1, 2, 2)  # stride of each conv; 64 -> 4 with these
    attributes: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(ATTRIBUTES))
    # ^ attribute -> values, one linear head each; must equal world.ATTRIBUTES to load

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        self.strides = tuple(self.strides)
        self.attributes = {name: tuple(values) for name, values in self.attributes.items()}
        if len(self.channels) != len(self.strides):
            raise ValueError(
                f"channels and strides need one entry per conv; found {len(self.channels)} channels and "
                f"{len(self.strides)} strides"
            )

    @property
    def feature_size(self) -> int:
        """Side of the last feature map."""
        side = self.image_size
        for stride in self.strides:
            side = (side + stride - 1) // stride
        return side

    def to_json(self) -> str:
        """One JSON form, read back by `from_json`."""
        return json.dumps(dataclasses.asdict(self))  # keeps attribute order

    @classmethod
    def from_json(cls, text: str) -> ReaderConfig:
        """Inverse of `to_json`."""
        return cls(**json.loads(text))


class AttributeReader(nn.Module):
    """Conv stack (3x3 conv, BatchNorm, ReLU per layer) whose flattened last map feeds one linear head per
    attribute. The map is flattened rather than pooled so the heads see where the shape is (position)."""

    def __init__(self, config: ReaderConfig | None = None) -> None:
        super().__init__()
        self.config = config or ReaderConfig()
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch, stride in zip(self.config.channels, self.config.strides):
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        flat = in_ch * self.config.feature_size**2
        self.heads = nn.ModuleDict({name: nn.Linear(flat, len(v)) for name, v in self.config.attributes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns attribute -> logits (N, num_values) for images (N, 3, S, S) in [0, 1]."""
        x = self.features(images * 2 - 1)  # (N, C, S/16, S/16); centred inputs
        x = x.flatten(1)  # (N, C * S/16 * S/16)
        return {name: head(x) for name, head in self.heads.items()}

    def _to_tensor(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """Stacks and resizes images to (N, 3, S, S) float32 in [0, 1] on the reader's device."""
        size = self.config.image_size
        device = next(self.parameters()).device
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected images of shape (N, 3, H, W); found {tuple(images.shape)}")
            if images.numel() and float(images.min()) < -0.5:
                raise ValueError(
                    f"expected pixel values in [0, 1]; found a minimum of {float(images.min()):.2f} "
                    "(for images in [-1, 1], pass (images + 1) / 2)"
                )
            if images.numel() and (not images.is_floating_point() or float(images.max()) > 1.5):
                raise ValueError(
                    f"expected float pixel values in [0, 1]; found {images.dtype} with a maximum of "
                    f"{float(images.max()):.1f} (for 0-255 images, pass images.float() / 255)"
                )
            x = images.to(device=device, dtype=torch.float32).clamp(0, 1)
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return x
        arrays = []
        for image in images:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BOX)
            arrays.append(np.asarray(image))
        if not arrays:
            return torch.zeros(0, 3, size, size, device=device)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
        return x.to(device=device, dtype=torch.float32) / 255

    @torch.no_grad()
    def predict_probs(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Class probabilities per attribute.

        Args:
            images: PIL images, or a float tensor (N, 3, H, W) in [0, 1].

        Returns:
            attribute -> probabilities (N, num_values), columns in `ATTRIBUTES[attribute]` order.
        """
        was_training = self.training
        self.eval()
        logits = self(self._to_tensor(images))
        self.train(was_training)
        return {name: value.softmax(-1) for name, value in logits.items()}

    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> list[Scene]:
        """Most likely scene per image.

        Args:
            images: PIL images, or a float tensor (N, 3, H, W) in [0, 1].

        Returns:
            One scene per image.
        """
        probs = self.predict_probs(images)
        index = {name: p.argmax(-1).tolist() for name, p in probs.items()}
        n = len(next(iter(index.values())))
        attrs = self.config.attributes
        return [Scene(**{name: attrs[name][index[name][i]] for name in attrs}) for i in range(n)]


def save_reader(reader: AttributeReader, path: str | Path) -> None:
    """Writes float16 weights (integer buffers unchanged) with the config JSON in the metadata."""
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().cpu()
        for k, v in reader.state_dict().items()
    }
    save_safetensors(state, path, {"config": reader.config.to_json(), "format": "ipadapter-tinyworld-reader"})


def load_reader(path: str | Path | None = None) -> AttributeReader:
    """Loads a reader strictly, in eval mode and float32.

    Args:
        path: a file written by `save_reader`; None loads the shipped weights.

    Returns:
        The reader.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if its config or tensors do not match this code's attribute table and architecture.
    """
    if path is None:
        resource = resources.files("ipadapter.tinyworld") / "assets" / DEFAULT_ASSET
        if not resource.is_file():
            raise FileNotFoundError(
                f"the shipped reader weights are missing at {resource}; retrain them with "
                "`python -m ipadapter.tinyworld.reader --out src/ipadapter/tinyworld/assets/reader.safetensors`"
            )
        with resources.as_file(resource) as file:
            return load_reader(file)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reader weights at {path}; train some with `python -m ipadapter.tinyworld.reader`")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} has no 'config' in its safetensors metadata; it was not written by save_reader")
    config = ReaderConfig.from_json(metadata["config"])
    if config.attributes != ATTRIBUTES:
        raise ValueError(
            f"{path} was trained for attributes {config.attributes}; this code's world has {ATTRIBUTES} "
            "(retrain the reader after changing the world)"
        )
    config.attributes = dict(ATTRIBUTES)  # same table; take this code's order for heads and outputs
    reader = AttributeReader(config)
    expected = reader.state_dict()
    found = load_file(str(path))
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(found[k].shape)}"
             for k in expected if k in found and expected[k].shape != found[k].shape]  # fmt: skip
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not match the reader config: missing {missing}, unexpected {unexpected}, "
                         f"wrong shapes {wrong}")  # fmt: skip
    reader.load_state_dict({k: v.to(expected[k].dtype) for k, v in found.items()})
    return reader.float().eval()


# ----------------------------------------------------------------------------------------------------------------
# Training. Kept in this file because it is short; the inference path above does not use it.


def render_tensors(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Renders `make_dataset(n, seed)` into tensors.

    Returns:
        images (n, 3, 64, 64) uint8 and attribute -> label indices (n,) int64.
    """
    samples = make_dataset(n, seed, caption_mode="none")
    images = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).contiguous()
    labels = {
        name: torch.tensor([values.index(getattr(s.scene, name)) for s in samples], dtype=torch.long)
        for name, values in ATTRIBUTES.items()
    }
    return images, labels


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light corruption so the reader tolerates generated (slightly blurred, noisy, off-colour) images.

    Per image: with probability 0.5 a Gaussian blur of standard deviation up to 1 px; with probability 0.2 a
    2x bilinear down- and upsampling; a contrast, brightness and per-channel gain change of at most 5%; and
    Gaussian noise with standard deviation up to 0.06.

    Args:
        images: float (N, 3, H, W) in [0, 1].
        generator: source of randomness.

    Returns:
        Augmented images in [0, 1], same shape.
    """
    n, c, h, w = images.shape

    def uniform(lo: float, hi: float, channels: int = 1) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, channels, 1, 1, generator=generator)

    def chance(p: float) -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, generator=generator) < p).float()

    sigma = uniform(0.05, 1.0).view(n, 1)  # (N, 1) px
    taps = torch.arange(-2.0, 3.0)  # 5-tap kernel covers 2 sigma at sigma = 1
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))  # (N, 5)
    kernel = kernel / kernel.sum(-1, keepdim=True)
    kernel = (kernel[:, :, None] * kernel[:, None, :]).repeat_interleave(c, 0)[:, None]  # (N*C, 1, 5, 5)
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate").reshape(1, n * c, h + 4, w + 4)
    blurred = F.conv2d(padded, kernel, groups=n * c).reshape(n, c, h, w)
    x = torch.lerp(images, blurred, chance(0.5))
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)
    x = torch.lerp(x, F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), chance(0.2))
    x = (x - 0.5) * uniform(0.95, 1.05) + 0.5 + uniform(-0.05, 0.05)
    x = x * uniform(0.96, 1.04, channels=c)
    x = x + torch.randn(x.shape, generator=generator) * uniform(0, 0.06)
    return x.clamp(0, 1)


@torch.no_grad()
def evaluate_reader(reader: AttributeReader, n: int, seed: int, batch_size: int = 250) -> dict[str, float]:
    """Accuracy per attribute on `n` clean images of `make_dataset(n, seed)`."""
    images, labels = render_tensors(n, seed)
    correct = {name: 0 for name in ATTRIBUTES}
    for start in range(0, n, batch_size):
        probs = reader.predict_probs(images[start : start + batch_size].float() / 255)
        for name, p in probs.items():
            correct[name] += int((p.argmax(-1) == labels[name][start : start + batch_size]).sum())
    return {name: correct[name] / max(n, 1) for name in ATTRIBUTES}


def train_reader(
    num_train: int,
    steps: int,
    seed: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    config: ReaderConfig | None = None,
    log_every: int = 100,
) -> AttributeReader:
    """Trains a reader on freshly rendered, lightly augmented images.

    The images `make_dataset(num_train, seed)` are rendered once into memory; AdamW with linear warm-up and
    cosine decay minimises the sum of the per-attribute cross-entropies.

    Args:
        num_train: number of training images.
        steps: optimiser steps.
        seed: seeds the training images, the initialisation, batches and augmentation.
        batch_size: images per step.
        lr: peak learning rate.
        config: architecture; None uses `ReaderConfig()`.
        log_every: print the loss every this many steps (0: never).

    Returns:
        The trained reader in eval mode.
    """
    if num_train < batch_size:
        raise ValueError(f"num_train must be at least batch_size={batch_size}; found {num_train}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = render_tensors(num_train, seed)
    reader = AttributeReader(config)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    reader.train()
    start = time.time()
    for step in range(steps):
        index = torch.randint(0, num_train, (batch_size,), generator=generator)
        x = augment(images[index].float() / 255, generator)
        logits = reader(x)
        loss = torch.stack([F.cross_entropy(logits[name], labels[name][index]) for name in ATTRIBUTES]).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
    return reader.eval()


def main(argv: Sequence[str] | None = None) -> int:
    """Trains a reader, saves it and prints held-out accuracy per attribute."""
    parser = argparse.ArgumentParser(description="Train the tiny-world attribute reader.")
    parser.add_argument("--out", required=True, help="where to write the float16 safetensors weights")
    parser.add_argument("--num-train", type=int, default=20_000, help="number of rendered training images")
    parser.add_argument("--steps", type=int, default=3_000, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed of training images and optimisation")
    parser.add_argument("--eval-n", type=int, default=2_000, help="number of held-out images")
    parser.add_argument("--eval-seed", type=int, default=HELD_OUT_SEED, help="seed of the held-out images")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    bad = {k: v for k, v in (("--num-train", args.num_train), ("--steps", args.steps), ("--batch-size", args.batch_size),
                             ("--eval-n", args.eval_n), ("--threads", args.threads)) if v < 1}  # fmt: skip
    if bad:
        parser.error(f"expected values >= 1, found {bad}")
    if not 0 < args.lr < float("inf"):
        parser.error(f"--lr must be a positive finite number, found {args.lr}")
    if args.eval_seed == args.seed:
        parser.error(f"--eval-seed must differ from --seed so accuracy is held out; both are {args.seed}")
    if Path(args.out).is_dir() or not Path(args.out).parent.is_dir():
        parser.error(f"--out is the weights file to write (its folder must exist), found {args.out!r}")
    torch.set_num_threads(args.threads)
    start = time.time()
    reader = train_reader(args.num_train, args.steps, args.seed, args.batch_size, args.lr)
    print(f"trained in {time.time() - start:.0f}s; {sum(p.numel() for p in reader.parameters())} parameters")
    save_reader(reader, args.out)
    accuracy = evaluate_reader(load_reader(args.out), args.eval_n, args.eval_seed)  # what was saved (float16)
    for name, value in accuracy.items():
        print(f"held-out accuracy {name:10s} {value:.4f}  ({args.eval_n} images, seed {args.eval_seed})")
    print(f"saved {args.out} ({Path(args.out).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
