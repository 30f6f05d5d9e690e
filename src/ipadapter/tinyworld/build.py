"""Builds the tiny Stable Diffusion stack from scratch on the tiny world, in resumable stages.

    python -m ipadapter.tinyworld.build --out runs/tinyworld --scale full --device cuda   # minutes on one GPU
    python -m ipadapter.tinyworld.build --out runs/tinyworld --scale full --threads 2 --jobs 2  # ~3 h, 2 CPU cores
    python -m ipadapter.tinyworld.build --out /tmp/tw --scale smoke                       # seconds; used by tests

`--recipe cpu|cuda` picks whose preset is used independently of `--device` (e.g. the CPU recipe trained on a GPU).

Stages, each writing DIR/<stage>/ and finally DIR/<stage>/done.json (config, steps, seconds, its check):

    tokenizer  word-level CLIPTokenizer                     check: every word one token, captions round-trip
    clip       CLIP text + vision towers, contrastive        check: text-to-image retrieval per attribute on
                                                                    held-out images; linear probe of hidden_states[-2]
               (its text tower is the pipeline's text encoder, SD1.5's CLIP ViT-L stand-in)
    vision     a second, independent contrastive CLIP run    check: as clip
               (its vision tower is the shipped image encoder, IP-Adapter's OpenCLIP ViT-H/14 stand-in: in the real
               world, too, SD's text encoder and IP-Adapter's image encoder are different CLIP models)
    vae        AutoencoderKL + its latent scaling_factor     check: reconstruction PSNR on held-out images
    unet       UNet2DConditionModel (EMA weights shipped)    check: a sample grid, and prompt following read by
                                                                    the attribute reader when its weights exist
    assemble   float16 StableDiffusionPipeline folder with image_encoder/ inside; check: it loads and generates
    adapters   IP-Adapters (base, plus) trained on the frozen stack by `ipadapter train` (the paper's recipe)
                                                             check: concept preservation of image-only prompting,
                                                                    read by the attribute reader

A stage with a done.json is skipped. Training stages save DIR/<stage>/checkpoint.pt atomically every
`checkpoint_every` steps (model, optimiser, EMA, random generators, step) and resume from it after a kill; the
checkpoint is deleted once done.json is written. The same command on the same device gives the same weights: on
CUDA, deterministic algorithms are on (cuDNN attention, which has none, is switched off) and torch warns about any
kernel left without one; `--nondeterministic` trades that for cuDNN autotuning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ipadapter.files import atomic_write, fix_modes, save_safetensors, write_text
from ipadapter.tinyworld import stack as stack_lib
from ipadapter.tinyworld.stack import StackConfig
from ipadapter.tinyworld.world import ATTRIBUTES, Scene, caption, make_dataset, sample_scene

logger = logging.getLogger("ipadapter.tinyworld.build")

STAGES = ("tokenizer", "clip", "vision", "vae", "unet", "assemble", "adapters")
REQUIRES: dict[str, tuple[str, ...]] = {  # stage -> stages whose outputs it reads
    "tokenizer": (),
    "clip": ("tokenizer",),
    "vision": ("tokenizer",),
    "vae": (),
    "unet": ("tokenizer", "clip", "vae"),
    "assemble": ("tokenizer", "clip", "vision", "vae", "unet"),
    "adapters": ("assemble",),
}
PIPELINE_FOLDER = "tinyworld-sd"  # DIR/assemble/<this>/ is the shipped StableDiffusionPipeline folder
STOPPED_EARLY = 3  # exit status when --stop-after interrupted a stage (rerun to resume)

# Seconds per optimiser step, used only to print an estimate before a build starts.
# CPU: measured on one core of a shared 2-core machine (torch 2.13, 1 thread) at the full-scale CPU batch sizes
#   (clip 128, vae 16, unet 32); scaled linearly with batch size.
CPU_SECONDS_PER_STEP = {"clip": 0.64, "vision": 0.64, "vae": 0.61, "unet": 0.69, "adapters": 1.2}  # adapters: both variants
# CUDA (H200, bf16 autocast): steps are bound by eager dispatch, not by arithmetic, so up to the full-scale batch
#   sizes the time hardly depends on the batch. unet: measured 0.104 s/step at batch 1024 (--nondeterministic, alone
#   on the GPU; 1800 steps in 254 s beside a second run). clip, vision, vae: measured with an earlier version that
#   synchronised with the host every step (clip 0.062 s at batch 512, vae 0.037 s at batch 64), estimates below.
CUDA_SECONDS_PER_STEP = {"clip": 0.04, "vision": 0.04, "vae": 0.037, "unet": 0.104}


# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class DataConfig:
    """The rendered images every stage trains and checks on."""

    num_train: int = 20_000  # training images: uniform random scenes with render jitter
    num_eval: int = 1_000  # held-out images for every stage's check
    train_seed: int = 0  # seed of the training images
    eval_seed: int = 10_000  # seed of the held-out images; must differ from train_seed
    chunk: int = 1_000  # images per make_dataset call; chunk i uses seed * 100_000 + i, whatever the workers
    workers: int = 1  # render processes (does not change the pixels)


@dataclass
class TrainConfig:
    """Optimisation shared by the training stages: AdamW, linear warm-up, cosine decay to `min_lr_ratio`."""

    steps: int = 1_000  # optimiser steps
    batch_size: int = 32  # images per step
    lr: float = 5e-4  # peak learning rate
    min_lr_ratio: float = 0.05  # final learning rate / peak
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    checkpoint_every: int = 500  # steps between resumable checkpoints
    log_every: int = 100  # steps between loss lines


@dataclass
class ClipTrainConfig(TrainConfig):
    """Contrastive CLIP training on captions that state random subsets of a scene's attributes.

    A caption matches every image in the batch that has all the attributes it states; the loss is cross-entropy
    against the uniform distribution over matches, in both directions (CLIP's loss when captions are unique).
    """

    full_caption_prob: float = 0.25  # captions stating every attribute
    attribute_prob: float = 0.5  # otherwise each attribute is stated with this probability (never none)
    init_logit_scale: float = 2.6593  # log(1 / 0.07), as in CLIP
    contrast_group: int = 4  # images per attribute-contrast group (1: plain random batches); see SceneIndex
    position_init_std: float = 0.3  # std of the ViT's initial position embeddings (transformers' default: 0.02)
    attribute_loss: float = 1.0  # weight of the attribute-readout loss on both embeddings (0: contrastive only)
    probe_fit: int = 600  # held-out images that fit the hidden_states[-2] linear probe; the rest test it


@dataclass
class VaeTrainConfig(TrainConfig):
    """AutoencoderKL training: MSE + l1_weight * L1 (pixels in [-1, 1]) + kl_weight * KL (summed per image)."""

    l1_weight: float = 0.5  # weight of the L1 term
    kl_weight: float = 1e-6  # weight of the KL term
    scale_images: int = 2_000  # training images whose latents measure scaling_factor = 1 / std


@dataclass
class UNetTrainConfig(TrainConfig):
    """Epsilon-prediction training on cached VAE latents with frozen text encoder and EMA."""

    ema_decay: float = 0.999  # EMA decay (warmed up as min(decay, (1 + step) / (10 + step)))
    snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weights min(SNR, gamma) / SNR (Hang et al. 2023); 0: plain MSE
    caption_dropout: float = 0.1  # empty captions, for classifier-free guidance
    full_caption_prob: float = 0.3  # captions stating every attribute
    attribute_prob: float = 0.5  # otherwise each attribute is stated with this probability (may be none)
    check_samples: int = 64  # held-out full captions sampled for the check
    check_steps: int = 25  # DDIM steps for the check samples
    guidance_scale: float = 4.0  # classifier-free guidance for the check samples


@dataclass
class AssembleConfig:
    """The shipped pipeline folder."""

    dtype: str = "float16"  # storage dtype of every weight file
    check_steps: int = 25  # DDIM steps of the CPU generation check
    guidance_scale: float = 4.0  # guidance of the CPU generation check


@dataclass
class AdaptersConfig:
    """IP-Adapters trained with the project's trainer (`ipadapter.training`) on the assembled, frozen stack."""

    variants: tuple[str, ...] = ("base", "plus")  # adapter variants to train
    num_train: int = 20_000  # rendered training images (data source tinyworld:N:SEED)
    steps: int = 1_500  # optimizer steps per variant, unless `variant_steps` names it
    variant_steps: dict[str, int] = field(default_factory=dict)  # e.g. {"plus": 6000}: a Resampler learns slower
    batch_size: int = 32  # batch size
    learning_rate: float = 1e-4  # AdamW learning rate (the paper's)
    checkpoint_every: int = 250  # steps between the trainer's atomic checkpoints
    check_references: int = 64  # held-out references for the concept-preservation check
    check_steps: int = 25  # DDIM steps of the check generations
    guidance_scale: float = 4.0  # classifier-free guidance of the check generations

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.variant_steps.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ValueError(f"adapters.variant_steps maps variant names to positive step counts; found {bad}")
        from ..variants import get_variant

        for name in self.variants:  # checked before any stage runs (the adapters stage is the last)
            get_variant(name)


@dataclass
class BuildConfig:
    """Everything that determines a build; done.json stores each stage's part."""

    scale: str = "full"  # name of the preset in SCALES
    seed: int = 0  # base seed; each stage adds its index
    data: DataConfig = field(default_factory=DataConfig)  # rendered images
    stack: StackConfig = field(default_factory=StackConfig)  # architectures
    clip: ClipTrainConfig = field(default_factory=ClipTrainConfig)  # clip stage (text encoder)
    vision: ClipTrainConfig = field(default_factory=ClipTrainConfig)  # vision stage (image encoder)
    vae: VaeTrainConfig = field(default_factory=VaeTrainConfig)  # vae stage
    unet: UNetTrainConfig = field(default_factory=UNetTrainConfig)  # unet stage
    assemble: AssembleConfig = field(default_factory=AssembleConfig)  # assemble stage
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)  # adapters stage

    def __post_init__(self) -> None:
        if self.data.eval_seed == self.data.train_seed:
            raise ValueError(f"data.eval_seed must differ from data.train_seed; both are {self.data.train_seed}")
        if self.data.num_train < max(self.clip.batch_size, self.vae.batch_size, self.unet.batch_size):
            raise ValueError(
                f"data.num_train={self.data.num_train} is smaller than a batch (clip {self.clip.batch_size}, "
                f"vae {self.vae.batch_size}, unet {self.unet.batch_size})"
            )

    def fingerprint(self, stage: str) -> dict[str, Any]:
        """The part of the config a stage's outputs depend on (render workers excluded)."""
        data = {k: v for k, v in dataclasses.asdict(self.data).items() if k != "workers"}
        part = {"seed": self.seed, "stack": self.stack.to_dict()}
        if stage in ("clip", "vision", "vae", "unet"):
            part["data"] = data
            part[stage] = dataclasses.asdict(getattr(self, stage))
        if stage == "assemble":
            part["assemble"] = dataclasses.asdict(self.assemble)
        if stage == "adapters":
            part["adapters"] = dataclasses.asdict(self.adapters)
        return json.loads(json.dumps(part))  # tuples -> lists, as read back from JSON


def _smoke(device: str) -> BuildConfig:
    """A few steps per stage on a handful of images, with the full architectures: seconds on a CPU."""
    tiny = dict(checkpoint_every=2, log_every=2, warmup=1)
    return BuildConfig(
        scale="smoke",
        data=DataConfig(num_train=48, num_eval=24, chunk=16),
        clip=ClipTrainConfig(steps=4, batch_size=16, lr=1e-3, probe_fit=12, **tiny),
        vision=ClipTrainConfig(steps=4, batch_size=16, lr=1e-3, probe_fit=12, **tiny),
        vae=VaeTrainConfig(steps=3, batch_size=8, lr=1e-3, scale_images=48, **tiny),
        unet=UNetTrainConfig(steps=4, batch_size=8, snr_gamma=5.0, check_samples=4, check_steps=3, **tiny),
        assemble=AssembleConfig(check_steps=2),
        adapters=AdaptersConfig(num_train=24, steps=3, variant_steps={"plus": 4}, batch_size=8, checkpoint_every=2,
                                check_references=2,
                                check_steps=2),
    )


def _full(device: str) -> BuildConfig:
    """The full build. CPU: about 203 minutes on 2 cores with `--threads 2 --jobs 2` (version 4 took 179; version 5
    trains Plus for 6000 steps instead of 1500, 32 instead of 9 minutes; its UNet's
    min-SNR weights let 384k samples do what 1.84M plain ones did in the GPU recipe).
    CUDA: 8-64x larger batches and fewer steps, since a GPU step costs about the same up to these batch sizes."""
    if device == "cuda":
        return BuildConfig(
            scale="full",
            data=DataConfig(num_train=50_000, workers=min(16, os.cpu_count() or 1)),
            clip=ClipTrainConfig(steps=1_200, batch_size=1024, lr=1e-3, warmup=100, weight_decay=0.05,
                                 checkpoint_every=400, log_every=200),  # fmt: skip
            vision=ClipTrainConfig(steps=1_200, batch_size=1024, lr=1e-3, warmup=100, weight_decay=0.05,
                                   checkpoint_every=400, log_every=200),  # fmt: skip
            vae=VaeTrainConfig(steps=2_500, batch_size=128, lr=1e-3, warmup=100, checkpoint_every=500,
                               log_every=250),  # fmt: skip
            unet=UNetTrainConfig(steps=1_800, batch_size=1024, lr=1e-3, warmup=200, ema_decay=0.998,
                                 checkpoint_every=500, log_every=250, check_samples=256),  # fmt: skip
            adapters=AdaptersConfig(num_train=20_000, steps=3_000, batch_size=128, checkpoint_every=1_000,
                                    check_references=256),  # fmt: skip
        )
    return BuildConfig(
        scale="full",
        data=DataConfig(num_train=20_000),
        clip=ClipTrainConfig(steps=3_000, batch_size=128, lr=1e-3, warmup=200, weight_decay=0.05,
                             checkpoint_every=250, log_every=100),  # fmt: skip
        vision=ClipTrainConfig(steps=3_000, batch_size=128, lr=1e-3, warmup=200, weight_decay=0.05,
                               checkpoint_every=250, log_every=100),  # fmt: skip
        vae=VaeTrainConfig(steps=5_000, batch_size=16, lr=1e-3, warmup=100, checkpoint_every=250, log_every=100),
        unet=UNetTrainConfig(steps=12_000, batch_size=32, lr=5e-4, warmup=200, ema_decay=0.999, snr_gamma=5.0,
                             checkpoint_every=250, log_every=100),  # fmt: skip
        adapters=AdaptersConfig(variant_steps={"plus": 6_000}),
    )


SCALES: dict[str, Callable[[str], BuildConfig]] = {"smoke": _smoke, "full": _full}  # name -> preset(device type)


def apply_overrides(config: BuildConfig, overrides: Sequence[str]) -> BuildConfig:
    """Applies "section.field=value" strings, e.g. "unet.batch_size=256" or "stack.unet.layers_per_block=2".

    Values are parsed as JSON when possible (numbers, lists), else taken as strings, and converted to the
    field's current type.

    Raises:
        ValueError: for a malformed override or an unknown field.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected an override like 'unet.batch_size=256'; found {item!r}")
        if key == "seed":
            raise ValueError("the build's seed is set with --seed, not --set seed=...")
        *path, name = key.split(".")
        target: Any = config
        for part in path:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ValueError(f"unknown config section {part!r} in {item!r}")
            target = getattr(target, part)
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            known = [f.name for f in dataclasses.fields(target)] if dataclasses.is_dataclass(target) else []
            raise ValueError(f"unknown config field {name!r} in {item!r}; expected one of {known}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        current = getattr(target, name)
        expected = type(current).__name__
        if isinstance(current, tuple):
            # a bare word or "a,b" is a list of names (tuple("base") would be its letters)
            value = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{key} expects a list like a,b or [\"a\", \"b\"], found {text!r}")
            value = tuple(value)
        elif isinstance(current, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key} expects true or false, found {text!r}")
        elif isinstance(current, (str, int, float)):
            if isinstance(current, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key} expects a number ({expected}), found {text!r}")
            if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{key} expects a whole number, found {text!r}")
            value = type(current)(value)
        setattr(target, name, value)
        if hasattr(target, "__post_init__"):
            target.__post_init__()
    config.stack.__post_init__()
    config.__post_init__()
    return config


# ----------------------------------------------------------------------------------------------------------------
# Data


def scene_indices(scene: Scene) -> list[int]:
    """Value index per attribute, in ATTRIBUTES order."""
    return [values.index(getattr(scene, name)) for name, values in ATTRIBUTES.items()]


def scene_from_indices(indices: Sequence[int]) -> Scene:
    """Inverse of `scene_indices`."""
    return Scene(**{name: values[int(i)] for (name, values), i in zip(ATTRIBUTES.items(), indices)})


def _render_chunk(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Renders `make_dataset(n, seed)`: images (n, 64, 64, 3) uint8 and scene indices (n, 6)."""
    n, seed = args
    samples = make_dataset(n, seed, caption_mode="none")
    return np.stack([np.asarray(s.image) for s in samples]), np.array([scene_indices(s.scene) for s in samples])


def render_split(n: int, seed: int, data: DataConfig, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders (or loads from `cache`) n images in chunks whose seeds do not depend on the worker count.

    Returns:
        images (n, 3, 64, 64) uint8 and scene indices (n, 6) int64.
    """
    if cache.exists():
        stored = torch.load(cache, weights_only=True)
        return stored["images"], stored["scenes"]
    jobs = [(min(data.chunk, n - start), seed * 100_000 + i) for i, start in enumerate(range(0, n, data.chunk))]
    started = time.time()
    if data.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(data.workers, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(job) for job in jobs]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W)
    scenes = torch.from_numpy(np.concatenate([p[1] for p in parts])).long()  # (n, 6)
    _atomic_save({"images": images, "scenes": scenes}, cache)
    logger.info("rendered %d images (seed %d) in %.1fs", n, seed, time.time() - started)
    return images, scenes


class CaptionTokens:
    """Token ids of `world.caption(scene, stated)` for whole batches, as tensor lookups (no Python per caption).

    For each of the 64 subsets of attributes a caption can state, every caption has the same length, and each
    stated attribute's value changes only its own token positions ("red" -> "blue", "on the left" -> "at the
    top"). So ids = template[subset], with each position owned by a stated attribute read from a per-value table.
    `__init__` derives the templates and tables from `world.caption` and the tokenizer (about 900 captions) and
    checks them against `world.caption` on random scenes; it raises ValueError if the decomposition does not hold.
    """

    def __init__(self, tokenizer, device: torch.device | str = "cpu", check: int = 512, seed: int = 0) -> None:
        names, length = list(ATTRIBUTES), tokenizer.model_max_length
        self.tokenizer = tokenizer
        self.bits = 2 ** torch.arange(len(names), device=device)  # (6,): subset index = sum of stated bits
        base = Scene(**{name: values[0] for name, values in ATTRIBUTES.items()})
        most = max(len(values) for values in ATTRIBUTES.values())
        template = torch.zeros(2 ** len(names), length, dtype=torch.long)  # (64, L)
        owner = torch.full((2 ** len(names), length), -1, dtype=torch.long)  # (64, L): attribute index or -1
        table = torch.zeros(2 ** len(names), length, most, dtype=torch.long)  # (64, L, values)
        for subset in range(2 ** len(names)):
            stated = [name for a, name in enumerate(names) if subset >> a & 1]
            template[subset] = torch.tensor(self._encode([caption(base, stated)]))[0]
            for name in stated:
                a, values = names.index(name), ATTRIBUTES[name]
                variants = torch.tensor(self._encode([caption(dataclasses.replace(base, **{name: v}), stated)
                                                      for v in values]))  # (values, L)  # fmt: skip
                moving = (variants != template[subset]).any(0)  # (L,) positions this attribute's value changes
                if (owner[subset][moving] >= 0).any():
                    raise ValueError(f"captions stating {stated} mix the tokens of {name!r} with another attribute's")
                owner[subset][moving] = a
                table[subset, :, : len(values)] += variants.T * moving[:, None]  # (L, values)
        self.template, self.owner, self.table = template.to(device), owner.to(device), table.to(device)
        self._check(check, seed)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        max_length = self.tokenizer.model_max_length
        return self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True).input_ids

    def ids(self, scenes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Token ids (n, L) of the captions of scenes (n, 6) stating masks (n, 6), on the tables' device."""
        scenes, masks = scenes.to(self.template.device), masks.to(self.template.device)
        subset = (masks.long() * self.bits).sum(1)  # (n,)
        owner = self.owner[subset]  # (n, L)
        value = scenes.gather(1, owner.clamp(min=0))  # (n, L): value index of each position's attribute
        positions = torch.arange(owner.shape[1], device=owner.device)
        lookup = self.table[subset[:, None], positions[None, :], value]  # (n, L)
        return torch.where(owner >= 0, lookup, self.template[subset])

    def _check(self, n: int, seed: int) -> None:
        if n <= 0:
            return
        rng = random.Random(seed)
        scenes = [sample_scene(rng) for _ in range(n)]
        masks = torch.tensor([[rng.random() < 0.5 for _ in ATTRIBUTES] for _ in range(n)], dtype=torch.bool)
        texts = [caption(s, [a for a, m in zip(ATTRIBUTES, row) if m]) for s, row in zip(scenes, masks)]
        expected = torch.tensor(self._encode(texts))
        found = self.ids(torch.tensor([scene_indices(s) for s in scenes]), masks).cpu()
        wrong = (found != expected).any(1).nonzero().flatten().tolist()
        if wrong:
            i = wrong[0]
            raise ValueError(f"caption templates disagree with world.caption for {texts[i]!r}: expected "
                             f"{expected[i].tolist()}, found {found[i].tolist()}")  # fmt: skip


class CaptionSampler:
    """Draws which attributes each caption states, on the generator's device."""

    def __init__(self, full_prob: float, attribute_prob: float, dropout: float, allow_empty: bool) -> None:
        self.full_prob = full_prob  # probability of stating every attribute
        self.attribute_prob = attribute_prob  # otherwise, probability of stating each attribute
        self.dropout = dropout  # probability of the empty caption, applied last
        self.allow_empty = allow_empty  # False: a draw stating nothing states everything instead

    def masks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Which attributes each of n captions states: (n, 6) bool."""
        device = generator.device
        stated = torch.rand(n, len(ATTRIBUTES), generator=generator, device=device) < self.attribute_prob
        full = torch.rand(n, 1, generator=generator, device=device) < self.full_prob
        stated = stated | full
        if not self.allow_empty:
            stated = stated | ~stated.any(1, keepdim=True)
        dropped = torch.rand(n, 1, generator=generator, device=device) < self.dropout
        return stated & ~dropped


class SceneIndex:
    """Finds training images by scene, to build attribute-contrast batches for contrastive training.

    In a random batch, two images rarely agree on every attribute but one, so the hard attributes (shape, position)
    almost never decide which caption goes with which image and CLIP learns the easy ones (colour, background) only.
    A contrast group is an anchor image plus `group - 1` images that differ from it in one attribute (chosen per
    group), whose captions all state that attribute: inside the group only that attribute tells them apart.
    """

    def __init__(self, scenes: torch.Tensor) -> None:
        sizes = torch.tensor([len(v) for v in ATTRIBUTES.values()], device=scenes.device)  # (6,)
        self.sizes = sizes
        self.strides = torch.cumprod(torch.cat([sizes.new_ones(1), sizes[:-1]]), 0)  # (6,) mixed radix
        codes = (scenes * self.strides).sum(1)  # (n,)
        self.order = codes.argsort()  # (n,) image indices sorted by scene code
        self.count = torch.bincount(codes, minlength=int(sizes.prod()))  # (combos,)
        self.start = torch.cumsum(self.count, 0) - self.count  # (combos,)
        self.scenes = scenes

    def groups(self, batch: int, group: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Image indices (batch,) and the contrasted attribute of each image (batch,), in groups of `group`.

        A member whose scene has no image falls back to a random image (still stating the group's attribute)."""
        device, n = generator.device, len(self.scenes)
        anchors = torch.randint(0, n, (batch // group,), generator=generator, device=device)  # (G,)
        attribute = torch.randint(0, len(self.sizes), (len(anchors),), generator=generator, device=device)  # (G,)
        scenes = self.scenes[anchors][:, None, :].repeat(1, group, 1)  # (G, g, 6)
        size = self.sizes[attribute]  # (G,)
        shift = 1 + (torch.rand(len(anchors), group - 1, generator=generator, device=device)
                     * (size[:, None] - 1)).long()  # (G, g-1) in 1..size-1: a different value  # fmt: skip
        column = scenes[:, 1:, :].gather(2, attribute[:, None, None].expand(-1, group - 1, 1))  # (G, g-1, 1)
        scenes[:, 1:, :] = scenes[:, 1:, :].scatter(2, attribute[:, None, None].expand(-1, group - 1, 1),
                                                      (column + shift[..., None]) % size[:, None, None])  # fmt: skip
        codes = (scenes * self.strides).sum(-1)  # (G, g)
        count = self.count[codes]
        pick = self.start[codes] + (torch.rand(codes.shape, generator=generator, device=device) * count).long()
        found = self.order[pick.clamp(max=n - 1)]
        fallback = torch.randint(0, n, codes.shape, generator=generator, device=device)
        index = torch.where(count > 0, found, fallback).flatten()  # (G * g,)
        rest = batch - index.numel()  # batch not divisible by group: random images, random attribute
        if rest:
            index = torch.cat([index, torch.randint(0, n, (rest,), generator=generator, device=device)])
            attribute = torch.cat([attribute.repeat_interleave(group),
                                   torch.randint(0, len(self.sizes), (rest,), generator=generator, device=device)])
        else:
            attribute = attribute.repeat_interleave(group)
        return index, attribute


def consistent(scenes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(n_text, n_image) bool: caption i (scene i stating masks i) is true of image j."""
    same = scenes[:, None, :] == scenes[None, :, :]  # (n, n, 6)
    return (same | ~masks[:, None, :]).all(-1)


# ----------------------------------------------------------------------------------------------------------------
# Training machinery


class Ema:
    """Exponential moving average of a model's parameters (float32 shadow copies)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in model.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.shadow)]


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save, whole or not at all (`files.atomic_write`: `--jobs` stages may write the same data)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_json(data: Any, path: Path) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True))


@dataclass
class Context:
    """What every stage needs besides its config."""

    out: Path  # build root
    config: BuildConfig  # the whole build config
    device: torch.device  # where training runs
    stop_after: int | None  # stop each training stage after this many steps of this run (tests, kills)

    @property
    def amp(self) -> bool:
        """bf16 autocast: only on CUDA."""
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """images (n, 3, 64, 64) uint8 and scenes (n, 6) of "train" or "eval", rendered once per build root."""
        d = self.config.data
        n, seed = (d.num_train, d.train_seed) if split == "train" else (d.num_eval, d.eval_seed)
        return render_split(n, seed, d, self.out / "data" / f"{split}_n{n}_seed{seed}_chunk{d.chunk}.pt")


class StoppedEarly(Exception):
    """A training stage stopped at --stop-after with its checkpoint saved."""


def train_loop(
    ctx: Context,
    stage: str,
    config: TrainConfig,
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    generators: dict[str, torch.Generator],
    ema: Ema | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) AdamW training of `model` on `loss_fn(step)`, checkpointing atomically.

    Returns:
        {"steps", "seconds" (all runs), "resumed_from" (step or None), "final_loss"}.

    Raises:
        StoppedEarly: after `ctx.stop_after` steps of this run, once the checkpoint is saved.
        ValueError: if a checkpoint from a different config is found.
    """
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]  # weight decay on these only
    others = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms, logit scale
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=ctx.device.type == "cuda")
    path = ctx.stage_dir(stage) / "checkpoint.pt"
    fingerprint = ctx.config.fingerprint(stage)
    start, elapsed, resumed_from = 0, 0.0, None
    if path.exists():
        state = torch.load(path, weights_only=True, map_location="cpu")
        if json.loads(state["fingerprint"]) != fingerprint:
            raise ValueError(
                f"{path} was written by a different config: expected {fingerprint}, found "
                f"{json.loads(state['fingerprint'])}; delete it or use another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
        start, elapsed, resumed_from = state["step"], state["seconds"], state["step"]
        logger.info("%s: resuming from step %d (checkpoint %s)", stage, start, path)

    def save(step: int, seconds: float) -> None:
        _atomic_save({
            "fingerprint": json.dumps(fingerprint),
            "step": step,
            "seconds": seconds,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "generators": {name: g.get_state() for name, g in generators.items()},
        }, path)  # fmt: skip

    model.train()
    run_start = time.time()
    running, count = torch.zeros((), device=ctx.device), 0  # loss sum since the last log line
    last_loss = float("nan")
    step = start
    for step in range(start, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip, foreach=True)
        optimizer.step()
        if ema is not None:
            ema.update(model, step)
        running += loss.detach()
        count += 1
        done_now = step + 1 - start
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps or done_now == 20:
            last_loss = float(running) / count  # the only host sync of the loop
            running.zero_()
            count = 0
            per_step = (time.time() - run_start) / done_now
            logger.info("%s: step %d/%d  loss %.4f  lr %.2e  %.3fs/step  eta %.1f min", stage, step + 1,
                        config.steps, last_loss, lr_at(step, config), per_step,
                        per_step * (config.steps - step - 1) / 60)  # fmt: skip
        finished = step + 1 == config.steps
        stopping = ctx.stop_after is not None and done_now >= ctx.stop_after and not finished
        if not finished and ((step + 1) % config.checkpoint_every == 0 or stopping):
            save(step + 1, elapsed + time.time() - run_start)
        if stopping:
            raise StoppedEarly(f"{stage} stopped at step {step + 1}/{config.steps}; rerun to resume")
    model.eval()
    return {"steps": config.steps, "seconds": elapsed + time.time() - run_start, "resumed_from": resumed_from,
            "final_loss": last_loss}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Stage: tokenizer


def stage_tokenizer(ctx: Context) -> dict[str, Any]:
    """Builds and saves the tokenizer; checks a reload round-trips captions."""
    from transformers import CLIPTokenizer

    folder = ctx.stage_dir("tokenizer")
    tokenizer = stack_lib.build_tokenizer(ctx.config.stack.tokenizer)
    stack_lib.save_tokenizer(tokenizer, folder)
    reloaded = CLIPTokenizer.from_pretrained(str(folder))
    stack_lib.check_tokenizer(reloaded, ctx.config.stack.tokenizer)
    rng = random.Random(ctx.config.seed)
    captions = [caption(sample_scene(rng), [a for a in ATTRIBUTES if rng.random() < 0.5]) for _ in range(500)]
    decoded = [reloaded.decode(reloaded(c).input_ids, skip_special_tokens=True) for c in captions]
    mismatched = [(c, d) for c, d in zip(captions, decoded) if c != d]
    if mismatched:
        raise ValueError(f"captions do not survive encode/decode: expected {mismatched[0][0]!r}, found {mismatched[0][1]!r}")
    return {"check": {"vocab_size": len(reloaded), "words": len(stack_lib.vocabulary()),
                      "longest_caption_tokens": len(reloaded(stack_lib.longest_caption()).input_ids),
                      "model_max_length": reloaded.model_max_length, "roundtrip_captions": len(captions)}}  # fmt: skip


def load_tokenizer(ctx: Context):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(ctx.stage_dir("tokenizer")))


# ----------------------------------------------------------------------------------------------------------------
# Stage: clip


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, 64, 64) -> CLIP pixel_values, identical to the saved CLIPImageProcessor's output."""
    return stack_lib.normalize_pixels(images.float() / 255)


class AttributeReadout(torch.nn.Module):
    """Linear heads that read each attribute from both CLIP embeddings, used as an auxiliary training loss.

    Contrastive training alone sits at a saddle for the attributes that are hard to see (shape, position): while
    neither tower encodes them, neither gets a gradient to start (the gradient of one side is proportional to the
    differences of the other side's embeddings), and at this data scale the easy attributes (colour, background)
    explain most of the batch. Measured on 2 cores: after 1,200 steps of batch 128 the pooled image embedding read
    position at chance (linear probe 0.26) and the text embeddings of "on the left" and "at the top" had cosine
    1.000. Web-scale CLIPs encode these attributes; these heads stand in for that scale. Text heads are trained only
    on the attributes a caption states; image heads on all of them. One head per attribute, shared by both towers,
    so that both embed an attribute value in the same direction, which contrastive matching then refines.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, len(values)) for values in ATTRIBUTES.values())

    def forward(self, text: torch.Tensor, image: torch.Tensor, scenes: torch.Tensor, stated: torch.Tensor):
        """Mean cross-entropy over attributes: images (B, D) on all, texts (B, D) on the stated ones."""
        total = text.new_zeros(())
        for a, head in enumerate(self.heads):
            total = total + F.cross_entropy(head(image.float()), scenes[:, a])
            per_text = F.cross_entropy(head(text.float()), scenes[:, a], reduction="none")  # (B,)
            total = total + (per_text * stated[:, a]).sum() / stated[:, a].sum().clamp(min=1)
        return total / (2 * len(self.heads))


def clip_embed_text(clip, ids: torch.Tensor) -> torch.Tensor:
    """Projected, L2-normalised text embeddings (n, projection_dim)."""
    return F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output).float(), dim=-1)


def clip_embed_images(clip, pixels: torch.Tensor) -> torch.Tensor:
    """Projected, L2-normalised image embeddings (n, projection_dim)."""
    return F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output).float(), dim=-1)


def stage_clip(ctx: Context, stage: str = "clip") -> dict[str, Any]:
    """Trains CLIP contrastively, saves the towers as text_encoder/ and image_encoder/ and checks them.

    `stage` "clip" gives the pipeline's text encoder, "vision" (other seeds, own config) the image encoder."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    cfg, stack = getattr(ctx.config, stage), ctx.config.stack
    folder = ctx.stage_dir(stage)
    offset = 0 if stage == "clip" else 1_000  # the vision run is an independent model
    tokenizer = load_tokenizer(ctx)
    images, scenes = ctx.data("train")
    images, scenes = images.to(ctx.device), scenes.to(ctx.device)
    torch.manual_seed(ctx.config.seed + 1 + offset)
    clip = stack_lib.build_clip(stack.clip, len(tokenizer), tokenizer.model_max_length)
    with torch.no_grad():
        clip.logit_scale.fill_(cfg.init_logit_scale)
        # Where the shape is lives only in the position embeddings. At transformers' init (std 0.02) they are about
        # 14x smaller than a patch's content embedding, and the pooled output stays blind to position for hundreds
        # of steps even under direct supervision (measured: chance after 200 steps, 0.81 after 300); at std 0.3 a
        # supervised probe reads position at 0.96 after 150 steps.
        torch.nn.init.normal_(clip.vision_model.embeddings.position_embedding.weight, std=cfg.position_init_std)
    clip.to(ctx.device)
    tokens = CaptionTokens(tokenizer, ctx.device)
    sampler = CaptionSampler(cfg.full_caption_prob, cfg.attribute_prob, dropout=0.0, allow_empty=False)
    batches = torch.Generator(ctx.device).manual_seed(ctx.config.seed + 101 + offset)
    index_by_scene = SceneIndex(scenes)

    def loss_fn(step: int) -> torch.Tensor:  # everything on ctx.device: no host sync
        if cfg.contrast_group > 1:
            index, contrasted = index_by_scene.groups(cfg.batch_size, cfg.contrast_group, batches)  # (B,), (B,)
            masks = sampler.masks(cfg.batch_size, batches)  # (B, 6)
            masks = masks.scatter(1, contrasted[:, None], True)  # the group's attribute is always stated
        else:
            index = torch.randint(0, len(images), (cfg.batch_size,), generator=batches, device=ctx.device)
            masks = sampler.masks(cfg.batch_size, batches)  # (B, 6)
        ids = tokens.ids(scenes[index], masks)  # (B, L)
        match = consistent(scenes[index], masks).float()  # (B text, B image)
        pixels = _pixels(images[index])  # (B, 3, 64, 64)
        with ctx.autocast():
            text = clip_embed_text(clip, ids)  # (B, D)
            image = clip_embed_images(clip, pixels)  # (B, D)
        logits = clip.logit_scale.exp().clamp(max=100) * text @ image.T  # (B text, B image)
        t2i = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        i2t = -(match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = (t2i + i2t) / 2
        if cfg.attribute_loss:
            loss = loss + cfg.attribute_loss * readout(text, image, scenes[index], masks)
        return loss

    readout = AttributeReadout(clip.config.projection_dim).to(ctx.device)
    trained = torch.nn.ModuleDict({"clip": clip, "readout": readout})  # the readout heads are not shipped
    result = train_loop(ctx, stage, cfg, trained, loss_fn, {"batches": batches})
    clip = clip.float().cpu().eval()
    text, vision = stack_lib.split_clip(clip)
    clip.save_pretrained(str(folder / "clip_model"))
    text.save_pretrained(str(folder / "text_encoder"))
    vision.save_pretrained(str(folder / "image_encoder"))
    stack_lib.image_processor(stack.clip).save_pretrained(str(folder / "image_encoder"))
    reload_error = stack_lib.clip_parity(clip, CLIPTextModel.from_pretrained(str(folder / "text_encoder")),
                                         CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder")))  # fmt: skip
    if reload_error > 1e-5:
        raise ValueError(f"the saved towers differ from the trained CLIP by {reload_error:.2e}; expected <= 1e-5")
    check = {"reload_max_abs_diff": reload_error, **clip_check(ctx, clip, vision, tokenizer, cfg.probe_fit)}
    logger.info("%s check: %s", stage, json.dumps(check))
    return {**result, "check": check}


@torch.no_grad()
def clip_check(ctx: Context, clip, vision, tokenizer, probe_fit: int, batch: int = 250) -> dict[str, Any]:
    """Held-out checks of the trained CLIP.

    - t2i_r_precision[attr]: for the caption stating only one value ("a red shape"), the fraction of the top-k
      retrieved held-out images that have it, k = how many have it; mean over values (chance = 1 / #values).
    - zero_shot_accuracy[attr]: how often an image's best-scoring one-attribute caption is its own value.
    - full_caption_t2i_top1: how often a full caption retrieves its own image first among the held-out images.
    - probe_accuracy[attr]: a ridge probe on the image encoder's flattened hidden_states[-2] (what IP-Adapter Plus
      reads), fit on the first `probe_fit` held-out images and tested on the rest.
    """
    images, scenes = ctx.data("eval")
    pixels = _pixels(images)
    image_embeds, hidden = [], []
    for start in range(0, len(images), batch):
        out = vision(pixel_values=pixels[start : start + batch], output_hidden_states=True)
        image_embeds.append(F.normalize(out.image_embeds, dim=-1))
        hidden.append(out.hidden_states[-2].flatten(1))  # (b, 65 * hidden)
    image_embeds, hidden = torch.cat(image_embeds), torch.cat(hidden)  # (n, D), (n, 65 * H)
    base = scene_from_indices([0] * len(ATTRIBUTES))
    r_precision, zero_shot = {}, {}
    for a, (name, values) in enumerate(ATTRIBUTES.items()):
        prompts = [caption(dataclasses.replace(base, **{name: v}), [name]) for v in values]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        sims = clip_embed_text(clip, ids.input_ids) @ image_embeds.T  # (values, n)
        labels = scenes[:, a]
        zero_shot[name] = float((sims.argmax(0) == labels).float().mean())
        precisions = []
        for v in range(len(values)):
            k = int((labels == v).sum())
            if k:
                precisions.append(float((labels[sims[v].topk(k).indices] == v).float().mean()))
        r_precision[name] = sum(precisions) / len(precisions)
    full = [caption(scene_from_indices(s.tolist()), ATTRIBUTES) for s in scenes]
    ids = tokenizer(full, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    text = torch.cat([clip_embed_text(clip, ids[i : i + batch]) for i in range(0, len(ids), batch)])
    top1 = float(((text @ image_embeds.T).argmax(1) == torch.arange(len(ids))).float().mean())
    fit = min(probe_fit, len(images) - 1)
    probe = ridge_probe(hidden[:fit], scenes[:fit], hidden[fit:], scenes[fit:])
    return {"t2i_r_precision": r_precision, "zero_shot_accuracy": zero_shot, "full_caption_t2i_top1": top1,
            "full_caption_pool": len(ids), "probe_accuracy_hidden_states_-2": probe,
            "chance": {name: 1 / len(values) for name, values in ATTRIBUTES.items()}}  # fmt: skip


def ridge_probe(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                alpha: float = 1.0) -> dict[str, float]:  # fmt: skip
    """Per-attribute accuracy of a one-vs-rest ridge regression on standardised features (dual form)."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    a, b = ((x_fit - mean) / std).double(), ((x_test - mean) / std).double()
    gram = a @ a.T  # (n_fit, n_fit)
    solve = torch.linalg.solve(gram + alpha * a.shape[1] / 100 * torch.eye(len(a), dtype=a.dtype), torch.eye(len(a), dtype=a.dtype))
    accuracy = {}
    for i, (name, values) in enumerate(ATTRIBUTES.items()):
        targets = F.one_hot(y_fit[:, i], len(values)).double()  # (n_fit, V)
        scores = b @ (a.T @ (solve @ targets))  # (n_test, V)
        accuracy[name] = float((scores.argmax(1) == y_test[:, i]).float().mean())
    return accuracy


# ----------------------------------------------------------------------------------------------------------------
# Stage: vae


def stage_vae(ctx: Context) -> dict[str, Any]:
    """Trains the AutoencoderKL, measures its scaling_factor and reconstruction PSNR."""
    cfg = ctx.config.vae
    folder = ctx.stage_dir("vae")
    images, _ = ctx.data("train")
    images_dev = images.to(ctx.device)
    torch.manual_seed(ctx.config.seed + 2)
    vae = stack_lib.build_vae(ctx.config.stack.vae).to(ctx.device)
    batches = torch.Generator(ctx.device).manual_seed(ctx.config.seed + 102)
    noise = torch.Generator(ctx.device).manual_seed(ctx.config.seed + 202)

    def loss_fn(step: int) -> torch.Tensor:
        index = torch.randint(0, len(images), (cfg.batch_size,), generator=batches, device=ctx.device)
        x = images_dev[index].float() / 127.5 - 1  # (B, 3, 64, 64) in [-1, 1]
        with ctx.autocast():
            posterior = vae.encode(x).latent_dist
        mean, logvar = posterior.mean.float(), posterior.logvar.float()  # (B, 4, 16, 16)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=noise, device=ctx.device)
        with ctx.autocast():
            reconstruction = vae.decode(z).sample.float()  # (B, 3, 64, 64)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        return F.mse_loss(reconstruction, x) + cfg.l1_weight * F.l1_loss(reconstruction, x) + cfg.kl_weight * kl

    result = train_loop(ctx, "vae", cfg, vae, loss_fn, {"batches": batches, "noise": noise})
    vae.eval()
    with torch.no_grad():
        latents = []
        scale_gen = torch.Generator(ctx.device).manual_seed(ctx.config.seed + 302)
        for start in range(0, min(cfg.scale_images, len(images)), 250):
            x = images_dev[start : min(start + 250, cfg.scale_images)].float() / 127.5 - 1
            latents.append(vae.encode(x).latent_dist.sample(generator=scale_gen).float())
        latents = torch.cat(latents)  # (n, 4, 16, 16)
        scaling_factor = float(1 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    vae = vae.float().cpu()
    vae.save_pretrained(str(folder / "vae"))
    check = vae_check(ctx, vae)
    check.update(scaling_factor=scaling_factor, latent_mean=float(latents.mean()), latent_std=float(latents.std()))
    logger.info("vae check: %s", json.dumps(check))
    return {**result, "check": check}


@torch.no_grad()
def vae_check(ctx: Context, vae, batch: int = 100) -> dict[str, Any]:
    """PSNR (dB, pixels in [0, 1], posterior mean decoded) on held-out images; reader accuracy on the
    reconstructions when the reader's weights exist; a grid of originals (odd rows) and reconstructions."""
    images, scenes = ctx.data("eval")
    recon = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].float() / 127.5 - 1
        recon.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).clamp(0, 1))
    recon = torch.cat(recon)  # (n, 3, 64, 64) in [0, 1]
    original = images.float() / 255
    mse = (recon - original).pow(2).mean((1, 2, 3))  # (n,)
    check: dict[str, Any] = {"psnr": float((10 * torch.log10(1 / mse.clamp(min=1e-10))).mean()),
                             "psnr_of_mean_mse": float(10 * torch.log10(1 / mse.mean())), "images": len(images)}  # fmt: skip
    rows = min(8, len(images))
    pairs = torch.stack([original[:rows], recon[:rows]], 1).flatten(0, 1)  # (2 * rows, 3, 64, 64)
    save_grid(pairs, ctx.stage_dir("vae") / "reconstructions.png", columns=2 * min(rows, 4))
    reader, why = _reader()
    if reader is None:
        check["reader"] = f"unavailable: {why}"
    else:
        predicted = torch.tensor([scene_indices(s) for s in reader.predict(recon)])
        check["reader_accuracy_on_reconstructions"] = {
            name: float((predicted[:, a] == scenes[:, a]).float().mean()) for a, name in enumerate(ATTRIBUTES)
        }
    return check


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """Saves (n, 3, H, W) images in [0, 1] as one PNG, `columns` per row."""
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * w, rows * h), (0, 0, 0))
    arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3)
    for i, array in enumerate(arrays):
        grid.paste(Image.fromarray(array), ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _reader():
    """(the shipped attribute reader, None) or (None, why it is unavailable)."""
    try:
        from ipadapter.tinyworld.reader import load_reader

        return load_reader(), None
    except (ImportError, FileNotFoundError, ValueError) as error:
        return None, str(error)


# ----------------------------------------------------------------------------------------------------------------
# Stage: unet


def stage_unet(ctx: Context) -> dict[str, Any]:
    """Trains the UNet on cached latents with a frozen text encoder; ships the EMA weights; samples a grid."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    cfg, stack = ctx.config.unet, ctx.config.stack
    folder = ctx.stage_dir("unet")
    tokenizer = load_tokenizer(ctx)
    text_encoder = CLIPTextModel.from_pretrained(str(ctx.stage_dir("clip") / "text_encoder")).to(ctx.device).eval()
    text_encoder.requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(str(ctx.stage_dir("vae") / "vae")).to(ctx.device).eval()
    images, scenes = ctx.data("train")
    scenes = scenes.to(ctx.device)
    latent_mean, latent_std = cached_latents(ctx, vae, images, folder / "latents.pt")  # (N, 4, 16, 16) each
    scaling = vae.config.scaling_factor
    torch.manual_seed(ctx.config.seed + 3)
    unet = stack_lib.build_unet(stack.unet).to(ctx.device)
    ema = Ema(unet, cfg.ema_decay)
    train_scheduler = stack_lib.build_train_scheduler(stack.scheduler)
    alphas = train_scheduler.alphas_cumprod.to(ctx.device)  # (T,)
    tokens = CaptionTokens(tokenizer, ctx.device)
    sampler = CaptionSampler(cfg.full_caption_prob, cfg.attribute_prob, cfg.caption_dropout, allow_empty=True)
    batches = torch.Generator(ctx.device).manual_seed(ctx.config.seed + 103)
    noise = torch.Generator(ctx.device).manual_seed(ctx.config.seed + 203)

    def loss_fn(step: int) -> torch.Tensor:  # everything on ctx.device: no host sync
        index = torch.randint(0, len(images), (cfg.batch_size,), generator=batches, device=ctx.device)
        ids = tokens.ids(scenes[index], sampler.masks(cfg.batch_size, batches))  # (B, L)
        shape = (cfg.batch_size, *latent_mean.shape[1:])
        latents = (latent_mean[index].float() + latent_std[index].float()
                   * torch.randn(shape, generator=noise, device=ctx.device)) * scaling  # (B, 4, 16, 16)  # fmt: skip
        eps = torch.randn(shape, generator=noise, device=ctx.device)
        t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=noise, device=ctx.device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * eps  # DDPM forward process, as scheduler.add_noise
        with torch.no_grad(), ctx.autocast():
            context = text_encoder(input_ids=ids).last_hidden_state  # (B, L, C)
        with ctx.autocast():
            prediction = unet(noisy, t, encoder_hidden_states=context).sample  # (B, 4, 16, 16)
        if cfg.snr_gamma <= 0:
            return F.mse_loss(prediction.float(), eps)
        per_sample = (prediction.float() - eps).pow(2).mean(dim=(1, 2, 3))  # (B,)
        return (min_snr_weights(alphas[t], cfg.snr_gamma) * per_sample).mean()

    result = train_loop(ctx, "unet", cfg, unet, loss_fn, {"batches": batches, "noise": noise}, ema=ema)
    ema.copy_to(unet)
    unet = unet.float().cpu().eval()
    unet.save_pretrained(str(folder / "unet"))
    train_scheduler.save_pretrained(str(folder / "scheduler"))
    check = unet_check(ctx, unet, text_encoder, vae, tokenizer)
    logger.info("unet check: %s", json.dumps(check))
    return {**result, "check": check}


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Epsilon-prediction loss weights of min-SNR-gamma: min(SNR, gamma) / SNR, with SNR = a / (1 - a). (B,) -> (B,)"""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=gamma) / snr


@torch.no_grad()
def cached_latents(ctx: Context, vae, images: torch.Tensor, path: Path, batch: int = 250) -> tuple[torch.Tensor, ...]:
    """Posterior mean and std of every training image under the trained VAE (float16, on ctx.device)."""
    if not path.exists():
        means, stds = [], []
        for start in range(0, len(images), batch):
            x = images[start : start + batch].to(ctx.device).float() / 127.5 - 1
            posterior = vae.encode(x).latent_dist
            means.append(posterior.mean.half().cpu())
            stds.append(posterior.std.half().cpu())
        _atomic_save({"mean": torch.cat(means), "std": torch.cat(stds)}, path)
    stored = torch.load(path, weights_only=True)
    return stored["mean"].to(ctx.device), stored["std"].to(ctx.device)


@torch.no_grad()
def sample_images(unet, text_encoder, vae, tokenizer, scheduler, prompts: Sequence[str], steps: int,
                  guidance_scale: float, seed: int, batch: int = 64) -> torch.Tensor:  # fmt: skip
    """Text-to-image with classifier-free guidance (Ho & Salimans 2022, eq. 6) and DDIM (Song et al. 2021).

    Returns:
        Images (n, 3, 64, 64) in [0, 1], on the CPU.
    """
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    latent_shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        ids = tokenizer(chunk + [""] * len(chunk), padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids.to(device)  # fmt: skip
        context = text_encoder(input_ids=ids).last_hidden_state  # (2b, L, C): prompts, then empty captions
        latents = torch.randn((len(chunk), *latent_shape), generator=generator).to(device)  # (b, 4, 16, 16)
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            eps = unet(torch.cat([latents, latents]), t, encoder_hidden_states=context).sample  # (2b, 4, 16, 16)
            cond, uncond = eps.chunk(2)
            latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
        decoded = vae.decode(latents / vae.config.scaling_factor).sample  # (b, 3, 64, 64) in [-1, 1]
        out.append(((decoded.float() + 1) / 2).clamp(0, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def unet_check(ctx: Context, unet, text_encoder, vae, tokenizer) -> dict[str, Any]:
    """Samples full captions of unseen-render scenes; saves the grid; scores prompt following with the reader."""
    from ipadapter.tinyworld.metrics import prompt_following

    cfg = ctx.config.unet
    _, scenes = ctx.data("eval")
    chosen = [scene_from_indices(s.tolist()) for s in scenes[: cfg.check_samples]]
    prompts = [caption(s, ATTRIBUTES) for s in chosen]
    device = ctx.device
    started = time.time()
    with ctx.autocast():
        images = sample_images(unet.to(device), text_encoder.to(device), vae.to(device), tokenizer,
                               stack_lib.build_sample_scheduler(ctx.config.stack.scheduler), prompts,
                               cfg.check_steps, cfg.guidance_scale, seed=ctx.config.seed + 403)  # fmt: skip
    unet.cpu(), text_encoder.cpu(), vae.cpu()
    save_grid(images, ctx.stage_dir("unet") / "samples.png", columns=min(8, len(images)))
    (ctx.stage_dir("unet") / "samples.txt").write_text("\n".join(prompts) + "\n")
    check: dict[str, Any] = {"samples": len(prompts), "sampling_seconds": time.time() - started,
                             "steps": cfg.check_steps, "guidance_scale": cfg.guidance_scale,
                             "grid": "samples.png (row-major; prompts in samples.txt)"}  # fmt: skip
    reader, why = _reader()
    if reader is None:
        check["reader"] = f"unavailable: {why}"
        return check
    read = reader.predict(images)
    check["prompt_following"] = sum(prompt_following(s.as_dict(), r) for s, r in zip(chosen, read)) / len(read)
    check["prompt_following_per_attribute"] = {
        name: sum(getattr(s, name) == getattr(r, name) for s, r in zip(chosen, read)) / len(read) for name in ATTRIBUTES
    }
    return check


# ----------------------------------------------------------------------------------------------------------------
# Stage: assemble


@torch.no_grad()
def _text_encoder_diff(ctx: Context, pipe, prompt: str) -> float:
    """Largest |difference| of last_hidden_state between the shipped (float16-stored) text encoder and the
    float32 one the UNet was trained with; large values mean the weights did not load."""
    from transformers import CLIPTextModel

    reference = CLIPTextModel.from_pretrained(str(ctx.stage_dir("clip") / "text_encoder")).eval()
    ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    found = pipe.text_encoder(input_ids=ids).last_hidden_state.float()
    return float((found - reference(input_ids=ids).last_hidden_state).abs().max())


def stage_assemble(ctx: Context) -> dict[str, Any]:
    """Writes the float16 StableDiffusionPipeline folder (+ image_encoder/) and checks it generates on a CPU."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    cfg = ctx.config.assemble
    dtype = getattr(torch, cfg.dtype)
    target = ctx.stage_dir("assemble") / PIPELINE_FOLDER
    if target.exists():
        shutil.rmtree(target)  # a half-written folder from a killed run
    clip_dir = ctx.stage_dir("clip")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(ctx.stage_dir("vae") / "vae")).to(dtype),
        text_encoder=CLIPTextModel.from_pretrained(str(clip_dir / "text_encoder")).to(dtype),
        tokenizer=load_tokenizer(ctx),
        unet=UNet2DConditionModel.from_pretrained(str(ctx.stage_dir("unet") / "unet")).to(dtype),
        scheduler=stack_lib.build_sample_scheduler(ctx.config.stack.scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(target), safe_serialization=True)
    vision = CLIPVisionModelWithProjection.from_pretrained(str(ctx.stage_dir("vision") / "image_encoder")).to(dtype)
    vision.save_pretrained(str(target / "image_encoder"))
    stack_lib.image_processor(ctx.config.stack.clip).save_pretrained(str(target / "image_encoder"))
    stack_lib.save_tokenizer(pipe.tokenizer, target / "tokenizer")  # also vocab.json / merges.txt
    for sub in ("text_encoder", "image_encoder"):
        declare_float32(target / sub / "config.json")
    prefix_text_encoder_keys(target / "text_encoder" / "model.safetensors")
    stack = ctx.config.stack.to_dict()
    stack["vae"]["scaling_factor"] = pipe.vae.config.scaling_factor  # measured by the vae stage (the config's: 1.0)
    (target / "tinyworld_stack.json").write_text(json.dumps(stack, indent=2))
    fix_modes(target)  # save_pretrained's safetensors files are private (0600) otherwise
    weights = sorted(target.rglob("*.safetensors"))
    check: dict[str, Any] = {
        "folder": str(target.relative_to(ctx.out)),
        "weight_bytes": {str(p.relative_to(target)): p.stat().st_size for p in weights},
        "total_weight_bytes": sum(p.stat().st_size for p in weights),
    }
    check.update(pipeline_check(ctx, target))
    logger.info("assemble check: %s", json.dumps(check))
    return {"check": check}


def declare_float32(config_path: Path) -> None:
    """Makes a transformers config say float32, so `from_pretrained` without a dtype upcasts the float16 weights.

    transformers 5 otherwise builds the module in the dtype the config records (float16 here), while diffusers
    builds float32 modules: the text encoder's float16 states would then meet a float32 UNet.
    """
    data = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in data:
            data[key] = "float32"
    data.setdefault("torch_dtype", "float32")
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True))


def prefix_text_encoder_keys(path: Path) -> None:
    """Stores the text encoder under "text_model.*" keys, the layout of SD1.5's text encoder and of transformers 4.

    transformers 5 saves CLIPTextModel without the "text_model." prefix, which transformers 4 would not load
    (it would leave the model randomly initialised); transformers 5 loads both layouts.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    tensors = load_file(str(path))
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
    save_safetensors(renamed, path, {**metadata, "format": "pt"})


@torch.no_grad()
def pipeline_check(ctx: Context, folder: Path) -> dict[str, Any]:
    """Loads the folder on a CPU with and without torch_dtype, generates, and compares the image encoder."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    cfg = ctx.config.assemble
    _, scenes = ctx.data("eval")
    prompt = caption(scene_from_indices(scenes[0].tolist()), ATTRIBUTES)
    result: dict[str, Any] = {"prompt": prompt}
    for label, kwargs in (("torch_dtype_float32", {"torch_dtype": torch.float32}), ("no_torch_dtype", {})):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # 0.42 prefers dtype
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), **kwargs)
        pipe.set_progress_bar_config(disable=True)
        dtypes = {name: str(getattr(pipe, name).dtype) for name in ("unet", "vae", "text_encoder")}
        try:
            image = pipe(prompt, num_inference_steps=cfg.check_steps, guidance_scale=cfg.guidance_scale,
                         generator=torch.Generator().manual_seed(ctx.config.seed + 503)).images[0]  # fmt: skip
            result[label] = {"dtypes": dtypes, "image_size": list(image.size)}
            if label == "torch_dtype_float32":
                image.save(folder.parent / "pipeline_sample.png")
                result["text_encoder_max_abs_diff_vs_float32"] = _text_encoder_diff(ctx, pipe, prompt)
        except Exception as error:  # report, not hide: done.json records what happened
            result[label] = {"dtypes": dtypes, "error": f"{type(error).__name__}: {error}"}
    # both loads are promised (docs/tinyworld.md: "with or without torch_dtype"): either failing fails the stage
    for label in ("torch_dtype_float32", "no_torch_dtype"):
        if "error" in result[label] or result[label]["image_size"] != [64, 64]:
            raise ValueError(f"the assembled pipeline must generate 64x64 images on a CPU ({label}); found {result}")
    if result["text_encoder_max_abs_diff_vs_float32"] > 1e-2:  # float16 storage: ~2e-3; weights not loaded: ~4
        raise ValueError(f"the shipped text encoder differs from the trained one by "
                         f"{result['text_encoder_max_abs_diff_vs_float32']:.3g} (expected <= 1e-2: float16 rounding); "
                         "its weights did not load")  # fmt: skip
    processor = CLIPImageProcessor.from_pretrained(str(folder / "image_encoder"))
    vision = CLIPVisionModelWithProjection.from_pretrained(str(folder / "image_encoder"))
    reference = CLIPVisionModelWithProjection.from_pretrained(str(ctx.stage_dir("vision") / "image_encoder"))
    sample = make_dataset(4, ctx.config.data.eval_seed + 1)
    pixels = processor(images=[s.image for s in sample], return_tensors="pt").pixel_values  # (4, 3, 64, 64)
    out = vision(pixel_values=pixels, output_hidden_states=True)
    ref = reference(pixel_values=pixels, output_hidden_states=True)
    result["image_encoder"] = {
        "dtype": str(vision.dtype),
        "pixel_values_shape": list(pixels.shape),
        "image_embeds_shape": list(out.image_embeds.shape),
        "hidden_states_-2_shape": list(out.hidden_states[-2].shape),
        "image_embeds_cosine_vs_float32": float(F.cosine_similarity(out.image_embeds, ref.image_embeds).min()),
    }
    if result["image_encoder"]["image_embeds_cosine_vs_float32"] < 0.999:  # float16 storage gives 0.9999999
        raise ValueError(f"the shipped image encoder's embeddings have cosine "
                         f"{result['image_encoder']['image_embeds_cosine_vs_float32']:.4f} with the trained one's "
                         "(expected >= 0.999); its weights did not load")  # fmt: skip
    return result


# ----------------------------------------------------------------------------------------------------------------
# Stage: adapters


def stage_adapters(ctx: Context) -> dict[str, Any]:
    """Trains each adapter variant with `ipadapter.training` on the frozen assembled stack, then checks CP."""
    from ipadapter.checkpoint import load_adapter
    from ipadapter.training import TrainConfig, Trainer
    from ipadapter.training.checkpointing import list_checkpoints

    cfg = ctx.config.adapters
    base = ctx.stage_dir("assemble") / PIPELINE_FOLDER
    training: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    for i, variant in enumerate(cfg.variants):
        folder = ctx.stage_dir("adapters") / variant
        shipped = folder / f"{variant}.safetensors"
        steps = cfg.variant_steps.get(variant, cfg.steps)
        if not shipped.exists():
            train_cfg = TrainConfig(
                base=str(base), variant=variant, data=f"tinyworld:{cfg.num_train}:{ctx.config.data.train_seed + 101}",
                resolution=64, batch_size=cfg.batch_size, max_steps=steps, learning_rate=cfg.learning_rate,
                cache_embeddings=True, cache_dir=str(folder / "cache"), output=str(folder / "run"),
                save_every=cfg.checkpoint_every, keep_last=1, seed=ctx.config.seed + 31 * (i + 1),
                resume="latest" if list_checkpoints(folder / "run") else "",
                mixed_precision="bf16" if ctx.amp else "no", log_every=max(1, cfg.checkpoint_every // 5),
                num_workers=min(8, os.cpu_count() or 1) if ctx.device.type == "cuda" else 0,
            )  # fmt: skip
            if ctx.stop_after is not None:
                train_cfg.max_steps = min(steps, _resumed_step(folder / "run") + ctx.stop_after)
            trainer = Trainer(train_cfg, show_progress=False)
            final = trainer.run()
            if train_cfg.max_steps < steps:
                raise StoppedEarly(f"adapters/{variant}: stopped at step {train_cfg.max_steps}; rerun to resume")
            record = {"steps": steps, "samples_per_s": trainer.samples_per_second, "train_seconds": trainer.loop_seconds}
            _atomic_write_json(record, folder / "training.json")  # kept beside the adapter for later runs
            load_adapter(final / "adapter.safetensors", dtype=torch.float16).save(shipped)
        if (folder / "training.json").is_file():
            training[variant] = json.loads((folder / "training.json").read_text())
        checks[variant] = adapter_check(ctx, base, shipped)
        logger.info("adapters/%s: %s %s", variant, json.dumps(training.get(variant)), json.dumps(checks[variant]))
    return {"check": checks, "training": training}


def _resumed_step(run: Path) -> int:
    from ipadapter.training.checkpointing import list_checkpoints

    found = list_checkpoints(run)
    return int(found[-1].name.split("-")[1]) if found else 0


@torch.no_grad()
def adapter_check(ctx: Context, base: Path, adapter_path: Path) -> dict[str, Any]:
    """Image-only prompting (scale 1, empty text) on held-out references: CP per attribute via the reader."""
    from diffusers import StableDiffusionPipeline

    from ipadapter.checkpoint import load_adapter
    from ipadapter.encoders import ImageEncoder
    from ipadapter.prompter import ImagePrompter
    from ipadapter.sources import diffusers_dtype
    from ipadapter.tinyworld.metrics import score_batch

    cfg = ctx.config.adapters
    reader, why = _reader()
    if reader is None:
        return {"skipped": why}
    pipe = StableDiffusionPipeline.from_pretrained(str(base), **diffusers_dtype(torch.float32)).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    encoder = ImageEncoder.from_pretrained(base / "image_encoder", device=ctx.device)
    adapter = load_adapter(adapter_path, dtype=torch.float32, image_encoder=encoder)
    prompter = ImagePrompter(pipe, adapter, encoder)
    samples = make_dataset(cfg.check_references, ctx.config.data.eval_seed + 7, caption_mode="none")
    generated = []
    for start in range(0, len(samples), 64):
        chunk = samples[start : start + 64]
        out = prompter(image=[s.image for s in chunk], prompt=[""] * len(chunk), scale=1.0,
                       num_inference_steps=cfg.check_steps, guidance_scale=cfg.guidance_scale,
                       generator=torch.Generator().manual_seed(ctx.config.seed + 977 + start))  # fmt: skip
        generated.extend(out.images)
    prompter.detach()
    scores = score_batch([s.scene for s in samples], reader.predict(generated))
    return {"references": len(samples), "cp": scores.cp, "cp_per_attribute": scores.cp_per_attribute,
            "guidance_scale": cfg.guidance_scale, "steps": cfg.check_steps}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Driver


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "tokenizer": stage_tokenizer,
    "clip": stage_clip,
    "vision": lambda ctx: stage_clip(ctx, "vision"),
    "vae": stage_vae,
    "unet": stage_unet,
    "assemble": stage_assemble,
    "adapters": stage_adapters,
}


def run_stage(ctx: Context, stage: str) -> dict[str, Any]:
    """Runs one stage unless its done.json exists; returns the done.json contents.

    Raises:
        ValueError: if a required stage is unfinished, or done.json came from a different config.
    """
    folder = ctx.stage_dir(stage)
    done_path = folder / "done.json"
    fingerprint = ctx.config.fingerprint(stage)
    if done_path.exists():
        done = json.loads(done_path.read_text())
        if done["config"] != fingerprint:
            raise ValueError(
                f"{done_path} was built with a different config: expected {fingerprint}, found {done['config']}; "
                f"delete {folder} (and the stages after it) or use another --out"
            )
        logger.info("%s: done already (%s), skipped", stage, done_path)
        return done
    missing = [s for s in REQUIRES[stage] if not (ctx.stage_dir(s) / "done.json").exists()]
    if missing:
        raise ValueError(f"stage {stage!r} needs the finished stages {list(REQUIRES[stage])}; missing {missing}")
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("%s: starting on %s", stage, ctx.device)
    started = time.time()
    result = STAGE_FUNCTIONS[stage](ctx)
    done = {"stage": stage, "config": fingerprint, "scale": ctx.config.scale, "device": str(ctx.device),
            "wall_seconds_this_run": time.time() - started, "versions": _versions(), **result}  # fmt: skip
    _atomic_write_json(done, done_path)
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    logger.info("%s: done in %.1fs -> %s", stage, time.time() - started, done_path)
    return done


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def estimate_minutes(config: BuildConfig, stages: Sequence[str], device: str) -> dict[str, float]:
    """Minutes per training stage: CPU_SECONDS_PER_STEP scaled by batch size (one thread), or
    CUDA_SECONDS_PER_STEP (batch-independent)."""
    reference = _full("cpu")
    table = CPU_SECONDS_PER_STEP if device == "cpu" else CUDA_SECONDS_PER_STEP
    estimate = {}
    for stage in stages:
        if stage in table:
            train = getattr(config, stage)
            scale = train.batch_size / getattr(reference, stage).batch_size if device == "cpu" else 1.0
            estimate[stage] = train.steps * table[stage] * scale / 60
    return estimate


def _configure_device(name: str, threads: int | None, deterministic: bool = True) -> torch.device:
    if threads is not None and threads < 1:
        raise ValueError(f"expected --threads >= 1, found {threads}")
    if threads is not None:
        torch.set_num_threads(threads)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False")
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
            torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill of every torch.empty
            torch.backends.cuda.enable_cudnn_sdp(False)  # its backward is nondeterministic (seen on an H200)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif name != "cpu":
        raise ValueError(f"--device must be 'cpu' or 'cuda'; found {name!r}")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipadapter.tinyworld.build",
                                     description="Build the tiny Stable Diffusion stack in resumable stages.")  # fmt: skip
    parser.add_argument("--out", required=True, help="build root; each stage writes OUT/<stage>/")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to train (bf16 on cuda)")
    parser.add_argument("--scale", default="full", choices=tuple(SCALES), help="preset: smoke (seconds) or full")
    parser.add_argument("--recipe", default=None, choices=("cpu", "cuda"),
                        help="whose hyperparameters the preset uses (default: the --device's); e.g. --device cuda "
                        "--recipe cpu trains the CPU recipe on a GPU")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="base seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. unet.batch_size=256 (repeatable)")  # fmt: skip
    parser.add_argument("--nondeterministic", action="store_true",
                        help="cuda only: allow nondeterministic kernels and cuDNN autotuning (faster; the same "
                        "command may then give slightly different weights)")  # fmt: skip
    parser.add_argument("--ship", default=None, metavar="ASSETS",
                        help="after a complete build, copy the pipeline folder and adapters into ASSETS (the "
                        "package's src/ipadapter/tinyworld/assets): REPLACES its sd/, clip/ and image_text_encoder/ folders, "
                        "adapters/<variant>.safetensors and build_checks.json")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1,
                        help="CPU: run up to this many independent stages side by side (tokenizer, clip, vision, "
                        "vae), each in its own process with threads / jobs threads; unet, assemble and adapters "
                        "run alone with every thread")  # fmt: skip
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop a training stage after this many steps of this run, leaving its checkpoint "
                        f"(simulates a kill; exit status {STOPPED_EARLY})")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Builds the requested stages; returns 0 when all finished, STOPPED_EARLY after --stop-after."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers and not logger.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    for noisy in ("transformers", "diffusers"):
        _quiet(noisy)
    if args.stop_after is not None and args.stop_after < 1:  # (0 trained one step in some stages, none in others)
        raise ValueError(f"--stop-after must be >= 1 (steps of this run), found {args.stop_after}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected names from {STAGES}")
    if args.ship:  # checked before hours of building: it copies the outputs of the last two stages
        unbuilt = [s for s in ("assemble", "adapters")
                   if s not in stages and not (Path(args.out) / s / "done.json").is_file()]  # fmt: skip
        if unbuilt:
            raise ValueError(f"--ship needs the finished stages assemble and adapters; {unbuilt} neither built in "
                             f"{args.out} nor among --stages")  # fmt: skip
    device = _configure_device(args.device, args.threads, deterministic=not args.nondeterministic)
    config = apply_overrides(SCALES[args.scale](args.recipe or device.type), args.overrides)
    config.seed = args.seed
    ctx = Context(out=Path(args.out), config=config, device=device, stop_after=args.stop_after)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ordered = [s for s in STAGES if s in stages]
    estimate = estimate_minutes(config, ordered, device.type)
    logger.info("estimated training minutes (%s): %s, total %.1f, plus rendering, latents and checks",
                "1 CPU thread" if device.type == "cpu" else "H200", {k: round(v, 1) for k, v in estimate.items()},
                sum(estimate.values()))  # fmt: skip
    started = time.time()
    if args.jobs > 1:
        if device.type != "cpu":
            raise ValueError(f"--jobs is for CPU builds (stages side by side on cores); found --device {args.device}")
        status = run_side_by_side(ctx, args, ordered, args.jobs, args.threads or torch.get_num_threads())
        if status != 0:
            return status
    for stage in ordered:
        try:
            run_stage(ctx, stage)  # with --jobs, every stage is done by now: this only logs the skips
        except StoppedEarly as stop:
            logger.info("%s", stop)
            return STOPPED_EARLY
    logger.info("build finished in %.1fs: %s", time.time() - started, ctx.out)
    if args.ship:
        ship(ctx, Path(args.ship))
    return 0


SOLO_STAGES = ("unet", "assemble", "adapters")  # with --jobs: run alone, with every thread


def run_side_by_side(ctx: Context, args: argparse.Namespace, stages: Sequence[str], jobs: int, threads: int) -> int:
    """Runs `stages` as child builds (one stage each), up to `jobs` at once with max(1, threads // jobs) threads;
    a stage starts once the stages it reads are done, and SOLO_STAGES start alone with `threads` threads. On 2 cores
    the CPU recipe's clip + vision (one process) and vae (another) then take about as long as the vae alone.

    Returns 0, or the first non-zero exit status of a child (after the running ones finish; none is started after)."""
    command = [sys.executable, "-m", "ipadapter.tinyworld.build", "--out", str(ctx.out), "--scale", args.scale,
               "--device", "cpu", "--seed", str(args.seed)]  # fmt: skip
    if args.recipe:
        command += ["--recipe", args.recipe]
    for override in args.overrides:
        command += ["--set", override]
    if args.stop_after is not None:
        command += ["--stop-after", str(args.stop_after)]

    def done(stage: str) -> bool:
        return (ctx.stage_dir(stage) / "done.json").exists()

    pending, running, status = [s for s in stages if not done(s)], {}, 0
    while pending or running:
        for stage in list(pending):
            blocked = any(r in pending or r in running for r in REQUIRES[stage])  # else done, or its error is shown
            solo = stage in SOLO_STAGES
            if status or blocked or len(running) >= jobs or (running and (solo or set(running) & set(SOLO_STAGES))):
                continue
            n = threads if solo else max(1, threads // jobs)
            env = {**os.environ, "OMP_NUM_THREADS": str(n)}
            logger.info("%s: starting in a child process with %d thread(s)", stage, n)
            running[stage] = subprocess.Popen([*command, "--stages", stage, "--threads", str(n)], env=env)
            pending.remove(stage)
        time.sleep(0.2)
        for stage, child in list(running.items()):
            code = child.poll()
            if code is not None:
                del running[stage]
                status = status or code
                if code:
                    logger.error("%s: child build exited with status %d", stage, code)
        if status and not running:
            break
    return status


def ship(ctx: Context, assets: Path) -> None:
    """Copies the finished pipeline folder and adapters into the package's assets folder."""
    missing = [s for s in ("assemble", "adapters") if not (ctx.stage_dir(s) / "done.json").exists()]
    if missing:
        raise ValueError(f"--ship needs the finished stages assemble and adapters; missing {missing}")
    target = assets / "sd"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(ctx.stage_dir("assemble") / PIPELINE_FOLDER, target)
    (assets / "adapters").mkdir(parents=True, exist_ok=True)
    for variant in ctx.config.adapters.variants:
        shutil.copy(ctx.stage_dir("adapters") / variant / f"{variant}.safetensors", assets / "adapters")
    save_eval_clip(ctx.out, assets / "clip", ctx.config.stack)
    save_image_text_encoder(ctx.out, assets / "image_text_encoder")
    checks = {stage: json.loads((ctx.stage_dir(stage) / "done.json").read_text()) for stage in STAGES}
    _atomic_write_json(checks, assets / "build_checks.json")
    fix_modes(assets)
    logger.info("shipped into %s", assets)


def save_image_text_encoder(build_dir: Path, target: Path) -> None:
    """The text tower of the `vision` stage's CLIP (the shipped image encoder's own pair, same embedding space), as a
    float16 CLIPTextModelWithProjection with its tokenizer: for InstantStyle's content subtraction."""
    from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

    clip = CLIPModel.from_pretrained(str(Path(build_dir) / "vision" / "clip_model"))
    text = CLIPTextModelWithProjection(clip.config.text_config)
    text.text_model.load_state_dict(clip.text_model.state_dict())
    text.text_projection.load_state_dict(clip.text_projection.state_dict())
    if target.exists():
        shutil.rmtree(target)
    text.half().save_pretrained(str(target))
    stack_lib.save_tokenizer(CLIPTokenizer.from_pretrained(str(Path(build_dir) / "tokenizer")), target)


def save_eval_clip(build_dir: Path, target: Path, stack: StackConfig) -> None:
    """The `clip` stage's whole CLIPModel (text + vision towers of one contrastive run), float16, with its tokenizer
    and image processor: the tiny world's stand-in for the ViT-L/14 that the paper's CLIP-I / CLIP-T use. Like the
    paper's, it is not the image encoder the adapters read (that one comes from the `vision` stage)."""
    from transformers import CLIPModel, CLIPTokenizer

    clip = CLIPModel.from_pretrained(str(Path(build_dir) / "clip" / "clip_model")).half()
    if target.exists():
        shutil.rmtree(target)
    clip.save_pretrained(str(target))
    stack_lib.save_tokenizer(CLIPTokenizer.from_pretrained(str(Path(build_dir) / "tokenizer")), target)
    stack_lib.image_processor(stack.clip).save_pretrained(str(target))


def _quiet(library: str) -> None:
    """Silences a library's progress bars and info logs."""
    module = __import__(library)
    module.utils.logging.set_verbosity_error()
    module.utils.logging.disable_progress_bar()


def cli(argv: Sequence[str] | None = None) -> int:
    """`python -m ipadapter.tinyworld.build`: main() with bad input as one line (`error: ...`, exit status 2)."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
