"""CLIP-I and CLIP-T with a CLIP model the user names (the paper uses ViT-L/14).

- CLIP-I: cosine similarity of the CLIP image embeddings of a generated image and its reference.
- CLIP-T: cosine similarity of a generated image's embedding and its caption's; CLIPScore (Hessel et al., 2021) is
  2.5 * max(cosine, 0), the form the paper's CLIP-T column reports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

CLIPSCORE_WEIGHT = 2.5


def resolve_clip(name: str) -> tuple[str, str | None]:
    """"tinyworld" -> the shipped tiny-world CLIP; "repo::subfolder" -> (repo, subfolder); else (name, None)."""
    if name == "tinyworld":
        from ..sources import TINYWORLD_DIR

        return str(TINYWORLD_DIR / "clip"), None
    if "::" in name:
        repo, sub = name.split("::", 1)
        return repo, sub
    return name, None


class ClipScorer:
    """A CLIPModel with its processor; embeds images and texts, L2-normalised."""

    def __init__(self, model, processor, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike = "tinyworld", device: str | torch.device = "cpu") -> ClipScorer:
        """A folder or hub id with both CLIP towers (e.g. openai/clip-vit-large-patch14), or "tinyworld"."""
        from transformers import CLIPModel, CLIPProcessor

        path, sub = resolve_clip(str(name))
        local = Path(path)
        if local.exists() and not (local / (sub or "") / "config.json").is_file():
            raise FileNotFoundError(f"{local / (sub or '')} is not a CLIP model folder: config.json missing")
        kwargs = {"subfolder": sub} if sub else {}
        if local.exists():  # a vision-only (image encoder) or text-only CLIP would load with a random other tower
            import json

            kind = json.loads((local / (sub or "") / "config.json").read_text()).get("model_type")
            if kind != "clip":
                raise ValueError(f"{local / (sub or '')} is a {kind!r} model; the scoring CLIP needs both towers "
                                 "(model_type 'clip', e.g. openai/clip-vit-large-patch14)")  # fmt: skip
        try:
            model, info = CLIPModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kwargs)
            processor = CLIPProcessor.from_pretrained(path, **kwargs)
        except OSError as e:
            raise FileNotFoundError(f"cannot load a CLIP model (both towers) from {name!r}: {e}") from e
        except (RuntimeError, ValueError) as e:  # e.g. a vision-only or text-only CLIP: shapes of another config
            raise ValueError(f"{name!r} is not a CLIP model with both towers (CLIPModel, e.g. "
                             f"openai/clip-vit-large-patch14): {str(e).splitlines()[-1]}") from e  # fmt: skip
        missing = sorted(info["missing_keys"])
        if missing:  # transformers would initialise them at random: CLIP-T (or CLIP-I) silently meaningless
            raise ValueError(f"{name!r} is not a complete CLIP model (both towers): {len(missing)} weights missing, "
                             f"such as {missing[:3]}")  # fmt: skip
        return cls(model, processor, device)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image], batch: int = 64) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings."""
        out = []
        for i in range(0, len(images), batch):
            pixels = self.processor(images=list(images[i : i + batch]), return_tensors="pt").pixel_values
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device))
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            out.append(F.normalize(feats.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings (truncated to the model's context)."""
        tokens = self.processor(text=list(texts), return_tensors="pt", padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)  # fmt: skip
        feats = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                             attention_mask=tokens.attention_mask.to(self.device))  # fmt: skip
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        return F.normalize(feats.float(), dim=-1)

    def clip_i(self, generated: Sequence[Image.Image], reference: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """(N,) cosine similarity of each generated image with its reference (one for all, or one each)."""
        refs = [reference] if isinstance(reference, Image.Image) else list(reference)
        g, r = self.image_embeds(generated), self.image_embeds(refs)
        return (g * r).sum(-1)

    def clip_t(self, generated: Sequence[Image.Image], text: str | Sequence[str]) -> torch.Tensor:
        """(N,) cosine similarity of each generated image with its caption (one for all, or one each)."""
        texts = [text] if isinstance(text, str) else list(text)
        g, t = self.image_embeds(generated), self.text_embeds(texts)
        return (g * t).sum(-1)


def clipscore(cosine: torch.Tensor | float) -> torch.Tensor | float:
    """CLIPScore = 2.5 * max(cosine, 0)."""
    if isinstance(cosine, torch.Tensor):
        return CLIPSCORE_WEIGHT * cosine.clamp(min=0)
    return CLIPSCORE_WEIGHT * max(cosine, 0.0)
