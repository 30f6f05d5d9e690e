"""The frozen CLIP image encoder, with the official IP-Adapter preprocessing and output selection.

Official preprocessing is a default `CLIPImageProcessor()`: resize the short side to 224 (bicubic), centre-crop
224, CLIP mean/std. Base variants read the pooled, projected `image_embeds`; Plus / full / FaceID-Plus read
`hidden_states[-2]` (penultimate layer, all tokens, no final norm). The unconditional input matches training: zeros
in embedding space for pooled features, the encoder run on a zero pixel tensor for penultimate ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .config import AdapterConfig, encoder_source


def model_source(name_or_path: str | os.PathLike, subfolder: str | None, what: str) -> tuple[str, dict]:
    """("repo::sub" or folder or hub id, subfolder) -> (name, {"subfolder": ...}); a local folder must hold config.json."""
    if subfolder is None and "::" in str(name_or_path):
        name_or_path, subfolder = str(name_or_path).split("::", 1)
    path = Path(name_or_path)
    if path.exists() and not (path / (subfolder or "") / "config.json").is_file():
        raise FileNotFoundError(f"no {what} config.json in {path / (subfolder or '')}")
    from .sources import looks_local

    if not path.exists() and looks_local(str(name_or_path)):  # (a hub id would fail with "Repo id must be ...")
        raise FileNotFoundError(f"{what} not found: {path} (expected a local model folder, or a hub id owner/name)")
    return str(name_or_path), ({"subfolder": subfolder} if subfolder else {})


class ImageEncoder(nn.Module):
    """A `CLIPVisionModelWithProjection` plus its preprocessing."""

    def __init__(self, model: nn.Module, processor=None, has_projection: bool = True) -> None:
        super().__init__()
        from transformers import CLIPImageProcessor

        self.model = model.eval().requires_grad_(False)
        # False: the weights had no visual_projection (a CLIPVisionModel): `image_embeds` would be random numbers
        self.has_projection = has_projection
        size = int(model.config.image_size)
        # Defaults = official `CLIPImageProcessor()` (bicubic, centre crop, CLIP mean/std), sized to the encoder.
        self.processor = processor or CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> ImageEncoder:
        """Loads a CLIPVisionModelWithProjection from a local folder or hub id.

        `"h94/IP-Adapter::models/image_encoder"` is short for `("h94/IP-Adapter", subfolder="models/image_encoder")`.
        """
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        name_or_path, sub = model_source(name_or_path, subfolder, "image encoder")
        kind = _config_kind(Path(name_or_path) / sub.get("subfolder", "") / "config.json")
        if kind is not None:
            raise ValueError(f"{Path(name_or_path) / sub.get('subfolder', '')} holds a {kind} (its config.json); "
                             "expected a CLIP vision encoder (model_type clip_vision_model, or clip)")  # fmt: skip
        import pickle

        from safetensors import SafetensorError

        try:
            model, info = CLIPVisionModelWithProjection.from_pretrained(str(name_or_path), dtype=dtype,
                                                                        output_loading_info=True, **sub, **kwargs)  # fmt: skip
        except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:  # damaged / unsafe weights
            where = Path(name_or_path) / sub.get("subfolder", "")
            raise ValueError(f"cannot load the image encoder weights in {where}: {error}") from error
        missing = sorted(info["missing_keys"])
        if [k for k in missing if not k.startswith("visual_projection.")]:
            raise ValueError(f"{name_or_path} is not a complete CLIP vision encoder: {len(missing)} weights missing, "
                             f"such as {missing[:3]}")  # fmt: skip
        processor = None
        try:
            processor = CLIPImageProcessor.from_pretrained(str(name_or_path), **sub, **kwargs)
        except (OSError, ValueError):
            processor = None  # h94's encoder folders ship no preprocessor config: use the official defaults
        return cls(model.to(device), processor, has_projection=not missing)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled, projected `image_embeds`."""
        return int(self.model.config.projection_dim)

    @property
    def hidden_dim(self) -> int:
        """Width of the hidden states (penultimate features)."""
        return int(self.model.config.hidden_size)

    def feature_dim(self, feature: str) -> int:
        return self.pooled_dim if feature == "pooled" else self.hidden_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Sequence[Image.Image] | Image.Image) -> torch.Tensor:
        """PIL images -> normalised pixels (B, 3, S, S)."""
        if isinstance(images, Image.Image):
            images = [images]
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        return pixels.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image] | Image.Image | torch.Tensor, feature: str) -> torch.Tensor:
        """Pooled (B, projection_dim) or penultimate (B, N, hidden) features of images or preprocessed pixels."""
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if feature == "pooled":
            return self.model(pixel_values=pixels).image_embeds  # (B, P)
        if feature == "penultimate":
            return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # (B, N, D)
        raise ValueError(f"feature must be 'pooled' or 'penultimate', found {feature!r}")

    @torch.no_grad()
    def unconditional(self, feature: str, batch_size: int = 1) -> torch.Tensor:
        """What training dropped images to: zero embeddings (pooled) or the encoding of zero pixels (penultimate)."""
        if feature == "pooled":
            return torch.zeros(batch_size, self.pooled_dim, device=self.device, dtype=self.dtype)
        size = int(self.model.config.image_size)
        zeros = torch.zeros(batch_size, 3, size, size, device=self.device, dtype=self.dtype)
        return self.encode(zeros, feature)


def check_encoder(config: AdapterConfig, encoder: nn.Module) -> None:
    """Raises ValueError, naming both encoders, when `encoder`'s output width is not what `config` consumes."""
    if config.image_feature == "none":
        return
    model_cfg = encoder.model.config if isinstance(encoder, ImageEncoder) else encoder.config
    # CLIPVisionConfig always has projection_dim; only a module with visual_projection gives image_embeds
    projected = (encoder.has_projection if isinstance(encoder, ImageEncoder)
                 else hasattr(encoder, "visual_projection") or not isinstance(encoder, nn.Module))  # fmt: skip
    if config.image_feature == "pooled" and not projected:
        raise ValueError(f"this adapter ({config.variant}) reads pooled, projected image_embeds; the image encoder has "
                         "no trained projection (its weights hold no visual_projection: a CLIPVisionModel)")  # fmt: skip
    found = int(model_cfg.projection_dim if config.image_feature == "pooled" else model_cfg.hidden_size)
    if found != config.image_embed_dim:
        raise ValueError(
            f"image encoder mismatch: this adapter ({config.variant}) expects {config.image_embed_dim}-d "
            f"{config.image_feature} features from {encoder_source(config.image_feature, config.image_embed_dim)}; "
            f"the encoder gives {found}-d ({encoder_source(config.image_feature, found)})"
        )


def _config_kind(path: Path) -> str | None:
    """What a config.json describes when it is not a CLIP vision encoder (a diffusers model, a text model), else None."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if "_class_name" in data:
        return f"diffusers {data['_class_name']}"
    model_type = data.get("model_type")
    if model_type is not None and model_type not in ("clip_vision_model", "clip"):
        return f"{model_type} model"
    return None


def check_encoder_folder(config: AdapterConfig, name_or_path: str | os.PathLike) -> None:
    """`check_encoder` from a local encoder folder's config alone, before any weights load ("repo::sub" and
    subfolders as `ImageEncoder.from_pretrained`). Hub ids pass (their config is not on disk)."""
    from types import SimpleNamespace

    from transformers import CLIPVisionConfig

    name, sub = model_source(name_or_path, None, "image encoder")
    if config.image_feature == "none" or not (Path(name) / sub.get("subfolder", "") / "config.json").is_file():
        return
    folder = Path(name) / sub.get("subfolder", "")
    kind = _config_kind(folder / "config.json")
    if kind is not None:
        raise ValueError(f"{folder} holds a {kind} (its config.json); expected a CLIP vision encoder "
                         "(model_type clip_vision_model, or clip)")  # fmt: skip
    try:
        found = CLIPVisionConfig.from_pretrained(name, **sub)  # what CLIPVisionModelWithProjection will be built from
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"cannot read the image encoder config in {name_or_path}: {error}") from error
    check_encoder(config, SimpleNamespace(config=found))


class TextEmbedder(nn.Module):
    """The text tower paired with an image encoder (same embedding space), for InstantStyle's content subtraction.

    SD1.5 adapters read OpenCLIP ViT-H/14 image embeddings: pair them with that model's text tower
    (`CLIPTextModelWithProjection`, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K). SDXL's bigG adapters: the pipeline's
    own `text_encoder_2` / `tokenizer_2`. The tiny world ships its pair in `image_text_encoder/`.
    """

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, subfolder: str | None = None,
                        device: str | torch.device = "cpu") -> TextEmbedder:  # fmt: skip
        """A CLIPTextModelWithProjection and its tokenizer from a folder or hub id ("tinyworld": the shipped pair)."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        if str(name_or_path) == "tinyworld":
            from .sources import TINYWORLD_DIR

            name_or_path = TINYWORLD_DIR / "image_text_encoder"
        name_or_path, sub = model_source(name_or_path, subfolder, "text encoder")
        model = CLIPTextModelWithProjection.from_pretrained(str(name_or_path), dtype=torch.float32, **sub).to(device)
        tokenizer_at, tokenizer_sub = str(name_or_path), sub
        # a pipeline's text_encoder(_2) (SDXL's text_encoder_2: the bigG adapters' pair) has its tokenizer beside it
        head, _, leaf = sub.get("subfolder", "").rstrip("/").rpartition("/")
        if leaf.startswith("text_encoder"):
            tokenizer_sub = {"subfolder": f"{head}/" * bool(head) + leaf.replace("text_encoder", "tokenizer", 1)}
        elif not sub and Path(name_or_path).name.startswith("text_encoder"):
            sibling = Path(name_or_path).parent / Path(name_or_path).name.replace("text_encoder", "tokenizer", 1)
            if sibling.is_dir() and not any((Path(name_or_path) / f).is_file() for f in ("vocab.json", "tokenizer.json")):
                tokenizer_at = str(sibling)
        return cls(model, CLIPTokenizer.from_pretrained(tokenizer_at, **tokenizer_sub))

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (N, projection_dim), unnormalised like the image encoder's `image_embeds`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(self.model.device)  # fmt: skip
        return self.model(input_ids=ids).text_embeds.float()
