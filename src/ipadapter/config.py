"""Typed configuration of an IP-Adapter: everything needed to rebuild its modules from nothing.

One JSON form (`to_json` / `from_json`) is stored in the metadata of the project's own safetensors checkpoints, so a
checkpoint describes itself. Official checkpoints carry no config; `checkpoint.detect_config` derives it from their
keys and shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

PROJECTIONS = ("linear", "resampler", "mlp", "faceid", "faceid_plus")
IMAGE_FEATURES = ("pooled", "penultimate", "none")
ATTENTIONS = ("decoupled", "concat")


@dataclass(frozen=True)
class ResamplerConfig:
    """Perceiver resampler of the Plus / FaceID-Plus projections (official `resampler.py`)."""

    dim: int  # width of the learned queries inside the resampler (768 SD1.5 Plus, 1280 SDXL Plus)
    depth: int = 4  # number of (attention, feed-forward) blocks
    dim_head: int = 64  # width of one attention head
    heads: int = 12  # number of attention heads
    ff_mult: int = 4  # hidden width of the feed-forward = ff_mult * dim


@dataclass(frozen=True)
class AdapterConfig:
    """Architecture of one IP-Adapter (projection + decoupled cross-attention layers)."""

    projection: str  # one of PROJECTIONS: linear (4 tokens), resampler (Plus), mlp (full), faceid, faceid_plus
    num_tokens: int  # image-prompt tokens produced per reference image (4, 16 or 257)
    cross_attention_dim: int  # width of the UNet's cross-attention context (768 SD1.5, 1024 SD2, 2048 SDXL)
    layer_hidden_sizes: tuple[int, ...]  # query width of each adapted cross-attention layer, in attn_processors order
    image_feature: str = "pooled"  # encoder output consumed: pooled `image_embeds`, penultimate hidden states, or none
    image_embed_dim: int = 0  # width of that encoder output (1024 ViT-H pooled, 1280 ViT-H hidden / bigG pooled, ...)
    id_embed_dim: int = 0  # width of the face-identity embedding for FaceID variants (512 ArcFace), 0 otherwise
    id_hidden_dim: int = 0  # hidden width of the FaceID identity MLP (official: 2 * id_embed_dim = 1024)
    resampler: ResamplerConfig | None = None  # set for resampler and faceid_plus projections
    lora_rank: int = 0  # rank of the FaceID LoRA on every attention's q/k/v/out; 0 = no LoRA
    lora_hidden_sizes: tuple[int, ...] = ()  # query width of every attention layer (attn1 and attn2) when lora_rank > 0
    shortcut: bool = False  # FaceID-PlusV2: tokens = id tokens + s_scale * resampler output
    attention: str = "decoupled"  # decoupled (paper §3.2) or concat (the paper's simple-adapter ablation, Fig. 10)
    variant: str = "custom"  # name in the variants table this matches ("sd15", "sdxl_plus", ...)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (source file, training run, ...)

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, found {self.projection!r}")
        if self.image_feature not in IMAGE_FEATURES:
            raise ValueError(f"image_feature must be one of {IMAGE_FEATURES}, found {self.image_feature!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, found {self.attention!r}")
        if self.attention == "concat" and self.lora_rank:
            raise ValueError("a concat adapter has no LoRA; found lora_rank > 0")
        if self.projection in ("resampler", "faceid_plus") and self.resampler is None:
            raise ValueError(f"projection {self.projection!r} needs a ResamplerConfig, found None")
        if self.lora_rank and len(self.lora_hidden_sizes) != 2 * len(self.layer_hidden_sizes):
            raise ValueError(
                f"a LoRA adapter needs one hidden size per attention layer (expected "
                f"{2 * len(self.layer_hidden_sizes)}), found {len(self.lora_hidden_sizes)}"
            )

    @property
    def num_layers(self) -> int:
        """Number of adapted cross-attention layers (16 for SD1.5, 70 for SDXL)."""
        return len(self.layer_hidden_sizes)

    @property
    def base_family(self) -> str:
        """The base model family this adapter was made for, judged by its shapes."""
        return base_family(self.cross_attention_dim, self.num_layers)

    @property
    def image_encoder_name(self) -> str:
        """Human name of the image encoder whose output this adapter consumes."""
        return image_encoder_name(self.image_feature, self.image_embed_dim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """The config `to_dict` wrote; a ValueError names any unknown, missing or mistyped field."""
        fields = _checked_fields(cls, data, "AdapterConfig")
        if fields.get("resampler") is not None:
            resampler = _checked_fields(ResamplerConfig, fields["resampler"], "AdapterConfig.resampler")
            fields["resampler"] = ResamplerConfig(**resampler)
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"AdapterConfig is not valid JSON ({e})") from e
        return cls.from_dict(data)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# field annotation -> (test of a JSON value, what the value should be)
_JSON_TYPES: dict[str, tuple[Any, str]] = {
    "int": (_whole, "a whole number >= 0"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "tuple[int, ...]": (lambda v: isinstance(v, (list, tuple)) and all(map(_whole, v)), "a list of whole numbers >= 0"),
    "ResamplerConfig | None": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "an object"),
}


def _checked_fields(cls: type, data: Any, what: str) -> dict[str, Any]:
    """`data` as keyword arguments of the dataclass `cls` (lists as tuples), after checking that it is an object with
    no unknown field, every required field, and values of the declared types."""
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a JSON object of fields, found {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; expected a subset of {sorted(fields)}")
    required = [name for name, f in fields.items() if f.default is f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{what}: required fields {missing} are missing")
    out = {}
    for name, value in data.items():
        accepts, expected = _JSON_TYPES[fields[name].type]
        if not accepts(value):
            raise ValueError(f"{what} field {name!r}: expected {expected}, found {_shown(value)}")
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _shown(value: Any) -> str:
    """A value as JSON would write it (null, true, "text"), cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def base_family(cross_attention_dim: int, num_layers: int) -> str:
    """Names the base model family from the cross-attention width and the number of cross-attention layers."""
    known = {(768, 16): "SD1.5", (1024, 16): "SD2.x", (2048, 70): "SDXL"}
    if (cross_attention_dim, num_layers) in known:
        return known[(cross_attention_dim, num_layers)]
    return f"custom ({num_layers} cross-attention layers of context width {cross_attention_dim})"


def image_encoder_name(image_feature: str, image_embed_dim: int) -> str:
    """Names the CLIP image encoder that produces `image_embed_dim`-wide `image_feature` outputs."""
    if image_feature == "none":
        return "none (face-identity embedding only)"
    known = {
        ("pooled", 1024): "ViT-H/14 (pooled image_embeds, 1024-d)",
        ("pooled", 1280): "ViT-bigG/14 (pooled image_embeds, 1280-d)",
        ("penultimate", 1280): "ViT-H/14 (penultimate hidden states, 1280-d)",
        ("penultimate", 1664): "ViT-bigG/14 (penultimate hidden states, 1664-d)",
    }
    if (image_feature, image_embed_dim) in known:
        return known[(image_feature, image_embed_dim)]
    return f"custom encoder ({image_feature} features, {image_embed_dim}-d)"


def encoder_source(image_feature: str, image_embed_dim: int) -> str:
    """`image_encoder_name` for messages that already state the feature and width: a custom encoder unrepeated."""
    name = image_encoder_name(image_feature, image_embed_dim)
    return "a custom encoder" if name.startswith("custom") else name
