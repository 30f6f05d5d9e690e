"""The tiny Stable Diffusion stack: typed configs and factories for every component, sized for 64x64 RGB images.

Each component is the real diffusers / transformers class at a miniature size, so the pipeline, IP-Adapter code
and checkpoint tools run on it unchanged:

    tokenizer      CLIPTokenizer whose BPE merges make every tiny-world word one token ("red</w>")
    text encoder   CLIPTextModel, trained contrastively together with ...
    image encoder  CLIPVisionModelWithProjection (64 px, patch 8: 64 patches + CLS = 65 tokens), ViT-H/14's stand-in
    VAE            AutoencoderKL, 64x64x3 -> 16x16x4
    UNet           UNet2DConditionModel on 16x16x4 latents with cross-attention at every level
    schedulers     DDPMScheduler for training, DDIMScheduler (trailing spacing) for sampling

Training lives in `ipadapter.tinyworld.build`; this module only builds, saves and describes.
"""

from __future__ import annotations

import dataclasses
import json
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ipadapter.tinyworld.world import vocabulary

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the pad and unknown token, as in OpenAI CLIP
END_OF_WORD = "</w>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP pixel mean, as in every SD image encoder
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TokenizerConfig:
    """The word-level BPE tokenizer."""

    model_max_length: int = 16  # tokens per caption incl. BOS/EOS; the longest tiny-world caption needs 14
    extra_words: tuple[str, ...] = ()  # words beyond `world.vocabulary()` that should be single tokens


@dataclass
class ClipConfig:
    """CLIP text and vision towers, trained together; sizes are the tiny stand-ins for SD1.5's ViT-L text encoder
    and IP-Adapter's ViT-H/14 image encoder."""

    text_hidden_size: int = 64  # width of the text transformer = the UNet's cross_attention_dim
    text_layers: int = 3  # text transformer layers
    text_heads: int = 4  # text attention heads (16-d each)
    text_intermediate_size: int = 256  # text MLP width
    vision_hidden_size: int = 128  # width of the ViT; hidden_states[-2] tokens are this wide
    vision_layers: int = 4  # ViT layers
    vision_heads: int = 4  # ViT attention heads (32-d each)
    vision_intermediate_size: int = 512  # ViT MLP width
    image_size: int = 64  # input side in pixels
    patch_size: int = 8  # 64 / 8 = 8x8 = 64 patches, + CLS = 65 tokens
    projection_dim: int = 64  # shared embedding width: `image_embeds` and the text projection
    hidden_act: str = "quick_gelu"  # as in OpenAI CLIP

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size; found image_size={self.image_size}, "
                f"patch_size={self.patch_size}"
            )
        for width, heads, what in ((self.text_hidden_size, self.text_heads, "text"),
                                   (self.vision_hidden_size, self.vision_heads, "vision")):  # fmt: skip
            if width % heads:
                raise ValueError(f"{what} hidden size must be divisible by its heads; found {width} and {heads}")

    @property
    def num_image_tokens(self) -> int:
        """Tokens in the vision encoder's hidden states: patches + CLS."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class VaeConfig:
    """AutoencoderKL: three encoder blocks, two of which halve the side, so 64x64x3 -> 16x16x4."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)  # channels per block; len - 1 downsamplings
    layers_per_block: int = 1  # resnets per encoder block (the decoder has one more, as in diffusers)
    latent_channels: int = 4  # as in SD
    norm_num_groups: int = 32  # GroupNorm groups; must divide every channel count
    image_size: int = 64  # sample_size in the config
    scaling_factor: float = 1.0  # 1 / std of the latents; the build measures it after training

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width; found {bad}")

    @property
    def latent_size(self) -> int:
        """Side of the latent grid."""
        return self.image_size // 2 ** (len(self.block_out_channels) - 1)


@dataclass
class UNetConfig:
    """UNet2DConditionModel on the VAE's latents, cross-attending to the text encoder at every level."""

    block_out_channels: tuple[int, ...] = (64, 96, 96)  # channels per level: 16x16, 8x8, 4x4 (4.3M params)
    layers_per_block: int = 1  # resnet + transformer pairs per down block (up blocks get one more)
    attention_head_dim: int = 4  # diffusers' legacy name: the NUMBER of heads (64/4 = 16-d, 96/4 = 24-d heads)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every channel count
    latent_channels: int = 4  # in and out channels = the VAE's latent channels
    sample_size: int = 16  # latent side = the VAE's latent_size
    cross_attention_dim: int = 64  # must equal ClipConfig.text_hidden_size

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups or c % self.attention_head_dim]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} and attention_head_dim={self.attention_head_dim} (heads) "
                f"must divide every block width; found {bad}"
            )


@dataclass
class SchedulerConfig:
    """Noise schedule shared by the training DDPM and the sampling DDIM scheduler.

    DDPM's linear betas (1e-4 to 0.02) leave sqrt(alpha_bar_T) = 0.006 of the signal at the last step, so training
    ends at (almost) pure noise, where sampling starts; SD's scaled_linear leaves 0.07, which shows on 16x16 latents.
    """

    num_train_timesteps: int = 1000  # training timesteps
    beta_schedule: str = "linear"  # diffusers beta_schedule name
    beta_start: float = 1e-4  # first beta
    beta_end: float = 0.02  # last beta
    prediction_type: str = "epsilon"  # what the UNet predicts
    timestep_spacing: str = "trailing"  # sampling timesteps start at T-1 (pure noise)
    num_inference_steps: int = 25  # default sampling steps (stored for documentation and the build's checks)


@dataclass
class StackConfig:
    """Every component of the tiny stack; one JSON form via `to_dict` / `from_dict`."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # word-level CLIP tokenizer
    clip: ClipConfig = field(default_factory=ClipConfig)  # text + vision towers
    vae: VaeConfig = field(default_factory=VaeConfig)  # image <-> latent
    unet: UNetConfig = field(default_factory=UNetConfig)  # latent denoiser
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # noise schedule

    def __post_init__(self) -> None:
        if self.unet.cross_attention_dim != self.clip.text_hidden_size:
            raise ValueError(
                f"unet.cross_attention_dim must equal clip.text_hidden_size; found {self.unet.cross_attention_dim} "
                f"and {self.clip.text_hidden_size}"
            )
        if self.unet.latent_channels != self.vae.latent_channels or self.unet.sample_size != self.vae.latent_size:
            raise ValueError(
                f"the UNet must match the VAE's latents ({self.vae.latent_channels} channels, side "
                f"{self.vae.latent_size}); found {self.unet.latent_channels} channels, side {self.unet.sample_size}"
            )
        if self.clip.image_size != self.vae.image_size:
            raise ValueError(
                f"the image encoder and VAE must see the same image size; found {self.clip.image_size} and "
                f"{self.vae.image_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackConfig:
        """Inverse of `to_dict`."""
        return cls(
            tokenizer=TokenizerConfig(**{**data["tokenizer"], "extra_words": tuple(data["tokenizer"]["extra_words"])}),
            clip=ClipConfig(**data["clip"]),
            vae=VaeConfig(**data["vae"]),
            unet=UNetConfig(**data["unet"]),
            scheduler=SchedulerConfig(**data["scheduler"]),
        )


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each word into one token, learnt from the word list itself.

    Starting from characters (the last one marked with "</w>"), repeatedly merges the most frequent adjacent pair
    (ties broken alphabetically, so the result is deterministic) until every word is a single symbol. Encoding a
    word with merges learnt on it replays its training segmentation, so each word ends as exactly one token.

    Args:
        words: distinct lower-case words.

    Returns:
        The merges, in rank order.
    """
    segments = {w: list(w[:-1]) + [w[-1] + END_OF_WORD] for w in dict.fromkeys(words)}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in segments.values():
            pairs.update(zip(symbols, symbols[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word, symbols in segments.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            segments[word] = merged


def tokenizer_vocab(config: TokenizerConfig) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json and merges.txt contents.

    Ids: 0 = BOS, 1 = EOS (= pad = unknown), then every printable ASCII character alone and word-final (so any
    text still tokenizes, character by character), then every merge result (the words among them).
    """
    words = sorted(set(vocabulary()) | set(config.extra_words))
    bad = [w for w in words if not w or not all(c in string.ascii_lowercase for c in w)]
    if bad:
        raise ValueError(f"tokenizer words must be non-empty lower-case ASCII; found {bad}")
    merges = learn_merges(words)
    characters = [chr(c) for c in range(33, 127)]  # printable ASCII without space: byte-level maps them to themselves
    tokens = [BOS_TOKEN, EOS_TOKEN] + characters + [c + END_OF_WORD for c in characters] + [a + b for a, b in merges]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges


def build_tokenizer(config: TokenizerConfig):
    """A `transformers.CLIPTokenizer` in which every tiny-world word is one token.

    Raises:
        ValueError: if some word does not come out as one token, or the longest caption does not fit.
    """
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab(config)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=config.model_max_length)
    check_tokenizer(tokenizer, config)
    return tokenizer


def check_tokenizer(tokenizer, config: TokenizerConfig) -> None:
    """Raises ValueError unless every world word is one token and the longest caption fits with BOS/EOS."""
    words = sorted(set(vocabulary()) | set(config.extra_words))
    split = {w: tokenizer.tokenize(w) for w in words}
    bad = {w: t for w, t in split.items() if t != [w + END_OF_WORD]}
    if bad:
        raise ValueError(f"expected every word to be one token; found {bad}")
    longest = longest_caption()
    needed = len(tokenizer(longest).input_ids)
    if needed > config.model_max_length:
        raise ValueError(
            f"model_max_length={config.model_max_length} is too short: {longest!r} needs {needed} tokens"
        )


def longest_caption() -> str:
    """A caption stating every attribute with the longest words."""
    from ipadapter.tinyworld.world import ATTRIBUTES, Scene, caption

    longest = {name: max(values, key=len) for name, values in ATTRIBUTES.items()}
    return caption(Scene(**longest), ATTRIBUTES)


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (and tokenizer.json), so
    `CLIPTokenizer.from_pretrained(folder)` works with transformers 4 and 5."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))  # tokenizer.json + tokenizer_config.json
    vocab = tokenizer.get_vocab()
    (folder / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.update(specials, tokenizer_class="CLIPTokenizer", model_max_length=tokenizer.model_max_length,
                            do_lower_case=True, errors="replace", add_prefix_space=False)  # fmt: skip
    config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------------
# CLIP


def build_clip(config: ClipConfig, vocab_size: int, max_length: int):
    """A randomly initialised `transformers.CLIPModel` (text + vision towers and both projections).

    Args:
        config: tower sizes.
        vocab_size: the tokenizer's vocabulary size.
        max_length: the tokenizer's model_max_length (text position embeddings).
    """
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(text_config=_text_config(config, vocab_size, max_length),
                                vision_config=_vision_config(config), projection_dim=config.projection_dim))  # fmt: skip


def _text_config(config: ClipConfig, vocab_size: int, max_length: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=max_length,
        hidden_act=config.hidden_act,
        projection_dim=config.projection_dim,
        bos_token_id=0,  # ids fixed by `tokenizer_vocab`; eos_token_id != 2 makes CLIP pool at the first EOS
        eos_token_id=1,
        pad_token_id=1,
    )


def _vision_config(config: ClipConfig) -> dict[str, Any]:
    return dict(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act=config.hidden_act,
        projection_dim=config.projection_dim,
    )


def split_clip(clip) -> tuple[Any, Any]:
    """Copies a CLIPModel's towers into a `CLIPTextModel` and a `CLIPVisionModelWithProjection` (float32, eval).

    Raises:
        ValueError: if the copies do not compute what the CLIPModel computes (see `clip_parity`).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    text = CLIPTextModel(CLIPTextConfig(**clip.config.text_config.to_dict()))
    # transformers 4 wraps the tower in `.text_model`; transformers 5 flattens it into the model itself
    getattr(text, "text_model", text).load_state_dict(clip.text_model.state_dict(), strict=True)
    vision_config = CLIPVisionConfig(**{**clip.config.vision_config.to_dict(), "projection_dim": clip.config.projection_dim})
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict(), strict=True)
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict(), strict=True)
    text, vision = text.float().eval(), vision.float().eval()
    error = clip_parity(clip, text, vision)
    if error > 1e-5:
        raise ValueError(f"the split towers differ from the CLIPModel by {error:.2e}; expected at most 1e-5")
    return text, vision


@torch.no_grad()
def clip_parity(clip, text, vision, seed: int = 0) -> float:
    """Largest absolute difference between a CLIPModel and separate towers on random inputs: the text encoder's
    last_hidden_state, the vision encoder's `image_embeds` and its hidden_states[-2]."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, clip.config.text_config.vocab_size, (2, clip.config.text_config.max_position_embeddings),
                        generator=generator)  # fmt: skip
    ids[:, 0], ids[:, -3:] = 0, 1  # BOS ... EOS pad pad
    side = clip.config.vision_config.image_size
    pixels = torch.randn(2, 3, side, side, generator=generator)
    device = next(text.parameters()).device
    was_training = clip.training
    clip.eval()
    reference_text = clip.text_model(input_ids=ids.to(clip.device)).last_hidden_state.float().cpu()
    reference_vision = clip.vision_model(pixel_values=pixels.to(clip.device), output_hidden_states=True)
    reference_embeds = clip.visual_projection(reference_vision.pooler_output).float().cpu()
    reference_hidden = reference_vision.hidden_states[-2].float().cpu()
    clip.train(was_training)
    found_text = text(input_ids=ids.to(device)).last_hidden_state.float().cpu()
    found_vision = vision(pixel_values=pixels.to(device), output_hidden_states=True)
    found_embeds, found_hidden = found_vision.image_embeds.float().cpu(), found_vision.hidden_states[-2].float().cpu()
    return max(float((reference_text - found_text).abs().max()), float((reference_embeds - found_embeds).abs().max()),
               float((reference_hidden - found_hidden).abs().max()))  # fmt: skip


def image_processor(config: ClipConfig):
    """The `CLIPImageProcessor` for the image encoder: resize the shortest edge to 64, centre-crop 64, CLIP
    mean/std; a no-op resize for tiny-world images."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": config.image_size},
        resample=3,  # bicubic, as in OpenAI CLIP
        do_center_crop=True,
        crop_size={"height": config.image_size, "width": config.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> CLIP-normalised pixel_values, exactly what `image_processor` gives for 64x64."""
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# VAE, UNet, schedulers


def build_vae(config: VaeConfig):
    """A randomly initialised `diffusers.AutoencoderKL`."""
    from diffusers import AutoencoderKL

    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.image_size,
        scaling_factor=config.scaling_factor,
    )


def build_unet(config: UNetConfig):
    """A randomly initialised `diffusers.UNet2DConditionModel` with cross-attention blocks at every level."""
    from diffusers import UNet2DConditionModel

    n = len(config.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        cross_attention_dim=config.cross_attention_dim,
    )


def _noise_schedule(config: SchedulerConfig) -> dict[str, Any]:
    """The arguments training and sampling schedulers share (same betas, same spacing)."""
    return {
        "num_train_timesteps": config.num_train_timesteps,
        "beta_schedule": config.beta_schedule,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "prediction_type": config.prediction_type,
        "clip_sample": False,  # latents are not in [-1, 1]
        "timestep_spacing": config.timestep_spacing,
    }


def build_train_scheduler(config: SchedulerConfig):
    """The `diffusers.DDPMScheduler` used to add noise in training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_noise_schedule(config))


def build_sample_scheduler(config: SchedulerConfig):
    """The `diffusers.DDIMScheduler` shipped with the pipeline: same betas, trailing timesteps from T-1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **_noise_schedule(config),
        set_alpha_to_one=True,  # the last step returns the clean estimate
        steps_offset=1,  # unused by trailing spacing; 1 keeps StableDiffusionPipeline from warning
    )