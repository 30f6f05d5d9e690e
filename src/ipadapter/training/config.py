"""Training configuration: the paper's recipe as defaults (paper §4.1, official tutorial_train*.py)."""

from __future__ import annotations

import dataclasses
import math
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Everything one training run needs; one JSON form is saved with every checkpoint."""

    # --- models ---
    base: str = "tinyworld"  # diffusers folder or hub id of the base model (SD1.5 family / SDXL), or "tinyworld"
    image_encoder: str = ""  # CLIP image encoder folder or hub id ("" = the base folder's image_encoder/, if any)
    variant: str = "base"  # adapter variant: base, plus, full, faceid, ... (see ipadapter.variants)
    init_adapter: str = ""  # fine-tune this checkpoint (official layout or ours) instead of starting from scratch
    # --- data ---
    data: str = ""  # JSON list, JSON Lines, a folder of images with .txt captions, WebDataset shards (*.tar, {a..b}) or tinyworld:N[:SEED]
    image_root: str = ""  # folder that relative `image_file` paths in JSON / JSONL are relative to
    resolution: int = 512  # short side resize, then centre crop to resolution x resolution
    max_samples: int = 0  # use only the first N samples (0 = all)
    # --- recipe ---
    learning_rate: float = 1e-4  # AdamW, constant (paper)
    weight_decay: float = 0.01  # AdamW weight decay (paper)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    warmup_steps: int = 0  # linear warm-up steps before the constant rate (0 = paper: none)
    max_grad_norm: float = 0.0  # gradient clipping (0 = off, as the paper)
    drop_image: float = 0.05  # probability to drop the image prompt only (one uniform draw per sample)
    drop_text: float = 0.05  # probability to drop the text only
    drop_both: float = 0.05  # probability to drop both
    noise_offset: float = 0.0  # add noise_offset * N(0,1) per (sample, channel) to the noise (0 = off)
    batch_size: int = 8  # per process
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps
    mixed_precision: str = ""  # no | fp16 | bf16 (frozen models run in that dtype; adapter weights stay fp32); "" = the launcher's (accelerate launch --mixed_precision, accelerate config), else no
    gradient_checkpointing: bool = False  # recompute UNet activations in backward to save memory
    seed: int = 0  # seeds data order, dropout draws, timesteps and noise
    # --- speed ---
    cache_embeddings: bool = False  # precompute image-encoder, text-encoder and VAE outputs once to disk
    cache_dir: str = ""  # where the cache lives (default: <output>/cache)
    num_workers: int = 0  # DataLoader worker processes for image decoding
    compile: str = ""  # torch.compile backend for the UNet's training step: "" (off), "inductor", ... (compiles once first)
    channels_last: bool = False  # UNet weights and activations in channels-last (NHWC) memory format (GPU convolutions)
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms for the run's fixed shapes (GPU; may pick non-deterministic ones)
    # --- checkpoints and feedback ---
    output: str = "runs/adapter"  # output folder: checkpoints, logs, validation images
    save_every: int = 500  # steps between checkpoints (also saved at the end)
    keep_last: int = 3  # checkpoints kept (older ones are deleted after a new one is safely written; 0 = all)
    resume: str = ""  # "latest", a checkpoint folder, or "" (start fresh; refuses to overwrite existing checkpoints)
    validate_every: int = 0  # steps between validation runs (0 = off)
    validation_images: int = 4  # number of fixed reference images (first samples of the data) to validate on
    validation_steps: int = 20  # denoising steps of validation generations
    log_every: int = 10  # steps between log lines / TensorBoard scalars
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with the run

    def __post_init__(self) -> None:
        self._check_types()
        for f in dataclasses.fields(self):  # inf / nan would train nothing or fail hours later
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, found {value}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), found {getattr(self, name)}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"seed must be within [-2**63, 2**64), found {self.seed}")
        for name in ("drop_image", "drop_text", "drop_both"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability: expected a value in [0, 1], found {getattr(self, name)}")
        total = self.drop_image + self.drop_text + self.drop_both
        if not 0 <= total <= 1:
            raise ValueError(f"drop probabilities must sum to a value in [0, 1], found {total}")
        if self.mixed_precision not in ("", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16 (or empty: the launcher's), found "
                             f"{self.mixed_precision!r}")  # fmt: skip
        if self.batch_size < 1 or self.max_steps < 1 or self.gradient_accumulation < 1:
            raise ValueError("batch_size, max_steps and gradient_accumulation must be >= 1")
        if self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels, found {self.resolution}")
        for name in ("save_every", "log_every", "validation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        for name in ("validate_every", "keep_last", "num_workers", "warmup_steps", "validation_images", "max_samples",
                     "max_grad_norm", "noise_offset", "weight_decay"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, found {getattr(self, name)}")
        if self.compile:
            from ..compiling import check_backend

            check_backend(self.compile)
        if not 0 < self.learning_rate <= 1e30:  # (1e38 overflowed inside AdamW's float32 arithmetic)
            raise ValueError(f"learning_rate must be in (0, 1e30], found {self.learning_rate}")

    def _check_types(self) -> None:
        """Each field has its declared type (a --config JSON may say "8" or "false"): ints may stand for floats,
        nothing else is converted, so a quoted "false" is not read as True."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default) if f.default is not dataclasses.MISSING else dict
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
                raise ValueError(f"{f.name} must be {expected}, found {value!r} ({type(value).__name__})")

    def resolved(self) -> TrainConfig:
        """This config with an empty mixed_precision replaced by the launcher's, as diffusers' training scripts do:
        `accelerate launch --mixed_precision bf16` (or `accelerate config`) tells its processes through the
        environment; without a launcher (`ipadapter train`), "no"."""
        if self.mixed_precision:
            return self
        import os

        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if launcher not in ("no", "fp16", "bf16"):
            raise ValueError(f"the launcher asks for mixed precision {launcher!r} (ACCELERATE_MIXED_PRECISION); the "
                             "trainer runs no, fp16 or bf16: pass --mixed-precision")  # fmt: skip
        return dataclasses.replace(self, mixed_precision=launcher)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
        return cls(**data)


def field_help() -> dict[str, str]:
    """Each field's comment, for the CLI's --help."""
    import inspect
    import re

    source = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(\w+): [^=]+= [^#]+#\s*(.+)$", source, re.M)}
