"""Tiny models for tests and benchmarks, built from shrunken copies of the real configs in tests/reference/.

The shrunken UNets keep the real block structure (so SD1.5-like has exactly 16 cross-attention layers in the same
order) and only make every width small.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REFERENCE = Path(__file__).parent / "reference"


def reference_json(relative: str) -> dict:
    return json.loads((REFERENCE / relative).read_text())


def unet_config(family: str, cross_attention_dim: int = 32, width: int = 32) -> dict:
    """A real UNet config with every width shrunk; `family` is 'sd15' or 'sdxl'."""
    cfg = {k: v for k, v in reference_json(f"{family}/unet_config.json").items() if not k.startswith("_")}
    n = len(cfg["block_out_channels"])
    cfg["block_out_channels"] = [width * min(2**i, 2) for i in range(n)]
    cfg["norm_num_groups"] = 8
    cfg["cross_attention_dim"] = cross_attention_dim
    cfg["sample_size"] = 8
    if family == "sd15":
        cfg["attention_head_dim"] = 4  # = number of heads in SD1.5 configs (legacy naming)
    else:
        cfg["attention_head_dim"] = [2, 4, 4]
        cfg["transformer_layers_per_block"] = [1, 2, 2]
        cfg["addition_time_embed_dim"] = 8
        cfg["projection_class_embeddings_input_dim"] = 8 * 6 + cross_attention_dim
    return cfg


def compact_unet_config(cross_attention_dim: int = 32) -> dict:
    """SD1.5's blocks cut to two levels of one layer: 4 cross-attention layers instead of 16. For tests of what does
    not depend on the depth (compilation, processes, launchers), where tracing or running 16 layers costs minutes."""
    cfg = unet_config("sd15", cross_attention_dim)
    cfg.update(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1)
    return cfg


def tiny_unet(family: str = "sd15", seed: int = 0, **kwargs):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    cfg = compact_unet_config(**kwargs) if family == "compact" else unet_config(family, **kwargs)
    return UNet2DConditionModel(**cfg).eval()


def real_unet_on_meta(family: str):
    """The full-size SD1.5 / SDXL UNet built on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in reference_json(f"{family}/unet_config.json").items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def unet_inputs(unet, batch: int, seed: int = 1, text_len: int = 7) -> dict:
    """Random latents, timestep, text states (and SDXL micro-conditioning) for one UNet call."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        "timestep": torch.tensor(500),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, cfg.cross_attention_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        }
    return inputs


def tiny_clip_vision(hidden: int = 48, projection: int = 40, image_size: int = 28, patch: int = 14, seed: int = 0):
    """A tiny CLIPVisionModelWithProjection shaped like ViT-H/14 (patch 14, 4 patches + CLS at 28 px)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=projection,
    )
    return CLIPVisionModelWithProjection(cfg).eval()


def make_sd_folder(path, seed: int = 0, compact: bool = False) -> tuple[str, str]:
    """A complete tiny SD1.5-shaped diffusers folder (16 px images, 8x8 latents) and a tiny image encoder folder;
    `compact`: with the 4-layer UNet of compact_unet_config.

    Returns (base folder, image encoder folder).
    """
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ipadapter.tinyworld.stack import TokenizerConfig, build_tokenizer

    path = Path(path)
    tokenizer = build_tokenizer(TokenizerConfig())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    unet = tiny_unet("compact" if compact else "sd15", seed=seed)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path / "sd")
    tiny_clip_vision(image_size=28).save_pretrained(path / "image_encoder")
    return str(path / "sd"), str(path / "image_encoder")


def make_world_folder(path, n: int, seed: int = 0, size: int = 16) -> str:
    """n tiny-world images with same-named .txt captions."""
    from pathlib import Path

    from ipadapter.tinyworld.world import make_dataset

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i, sample in enumerate(make_dataset(n, seed=seed, size=size)):
        sample.image.save(path / f"{i:04d}.png")
        (path / f"{i:04d}.txt").write_text(sample.caption)
    return str(path)


def make_sdxl_folder(path, seed: int = 0) -> str:
    """A complete tiny SDXL-shaped diffusers folder: two text encoders (16 + 16 = 32-d context), size/crop ids."""
    from pathlib import Path

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ipadapter.tinyworld.stack import TokenizerConfig, build_tokenizer

    tokenizer = build_tokenizer(TokenizerConfig())
    torch.manual_seed(seed)

    def text_config(**kw):
        return CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **kw)

    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config()), text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=32)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=tiny_unet("sdxl", seed=seed), scheduler=DDPMScheduler(),
    )
    pipe.save_pretrained(Path(path) / "sdxl")
    return str(Path(path) / "sdxl")


def make_proportional_sd15(path, width: float = 0.5, resolution: int = 256, seed: int = 0) -> tuple[str, str]:
    """SD1.5 + ViT-H/14 with the real depths and every width times `width`, for timing at real proportions.

    Scaling every width by w scales every model's cost by about w^2, so their ratios stay the real ones. At
    `resolution` r the UNet and VAE cost (r/512)^2 of 512 px training; the image encoder gets the input side that
    scales its token count by the same factor (224 * r / 512), so it too keeps its real share. Random weights.

    Returns (base folder, image encoder folder).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter.tinyworld.stack import TokenizerConfig, build_tokenizer

    def scaled(channels):
        return [int(c * width) for c in channels]

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TokenizerConfig(model_max_length=77))
    text = reference_json("sd15/text_encoder_config.json")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=int(text["hidden_size"] * width), intermediate_size=int(text["intermediate_size"] * width),
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=int(text["num_attention_heads"] * width),
        vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act=text["hidden_act"],
    ))  # fmt: skip
    unet_cfg = {k: v for k, v in reference_json("sd15/unet_config.json").items() if not k.startswith("_")}
    unet_cfg.update(block_out_channels=scaled(unet_cfg["block_out_channels"]), sample_size=resolution // 8,
                    cross_attention_dim=text_encoder.config.hidden_size)  # fmt: skip
    vae_cfg = {k: v for k, v in reference_json("sd15/vae_config.json").items() if not k.startswith("_")}
    vae_cfg.update(block_out_channels=scaled(vae_cfg["block_out_channels"]), sample_size=resolution)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_cfg), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_cfg), scheduler=DDPMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path / "sd15-proportional")
    vit = {k: v for k, v in reference_json("ip_adapter/image_encoder_vit_h_config.json").items()
           if k in ("hidden_act", "num_hidden_layers", "patch_size", "layer_norm_eps")}  # fmt: skip
    vit_h = reference_json("ip_adapter/image_encoder_vit_h_config.json")
    side = round(vit_h["image_size"] * resolution / 512 / vit["patch_size"]) * vit["patch_size"]
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=int(vit_h["hidden_size"] * width), intermediate_size=int(vit_h["intermediate_size"] * width),
        num_attention_heads=int(vit_h["num_attention_heads"] * width), projection_dim=int(vit_h["projection_dim"] * width),
        image_size=side, **vit,
    )).save_pretrained(path / "image_encoder")  # fmt: skip
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        path / "image_encoder")
    return str(path / "sd15-proportional"), str(path / "image_encoder")


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's rendezvous in tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
