"""Writes a diffusers SD1.5-family pipeline as one original-layout (LDM) checkpoint file, the way community models are
shared, so tests can load a single file offline exactly like a user's downloaded model.

Only what SD1.5-family pipelines hold: UNet (`model.diffusion_model.`), VAE (`first_stage_model.`) and the CLIP
text encoder (`cond_stage_model.transformer.`). The key names follow the original Stable Diffusion repository.
"""

from __future__ import annotations

from pathlib import Path

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(key: str, table: dict[str, str]) -> str:
    head, _, tail = key.partition(".")
    return table.get(head, head) + "." + tail if tail else table.get(head, head)


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int, num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` keys."""
    out = {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for key, value in state.items():
        parts = key.split(".")
        new = None
        for src, dst in fixed.items():
            if key.startswith(src + "."):
                new = dst + key[len(src):]
        if parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{i * (layers_per_block + 1) + j + 1}.0.{_rename(rest, RESNET)}"
            elif kind == "attentions":
                new = f"input_blocks.{i * (layers_per_block + 1) + j + 1}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * (layers_per_block + 1)}.0.op.{'.'.join(parts[5:])}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            n = layers_per_block + 1
            if kind == "resnets":
                new = f"output_blocks.{i * n + j}.0.{_rename(rest, RESNET)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * n + j}.1.{rest}"
            elif kind == "upsamplers":
                has_attention = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
                new = f"output_blocks.{i * n + n - 1}.{2 if has_attention else 1}.conv.{'.'.join(parts[5:])}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j if kind == 'resnets' else 1}.{_rename(rest, RESNET) if kind == 'resnets' else rest}"
        if new is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> `first_stage_model.*` keys (attention projections as 1x1 convolutions)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        if parts[0] in ("encoder", "decoder"):
            side, rest = parts[0], parts[1:]
            if rest[0] in ("down_blocks", "up_blocks"):
                i = int(rest[1]) if side == "encoder" else num_blocks - 1 - int(rest[1])
                level = "down" if side == "encoder" else "up"
                if rest[2] == "resnets":
                    new = f"{side}.{level}.{i}.block.{rest[3]}.{_rename('.'.join(rest[4:]), VAE_RESNET)}"
                else:  # downsamplers / upsamplers
                    new = f"{side}.{level}.{i}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{rest[-1]}"
            elif rest[0] == "mid_block":
                if rest[1] == "resnets":
                    new = f"{side}.mid.block_{int(rest[2]) + 1}.{_rename('.'.join(rest[3:]), VAE_RESNET)}"
                else:
                    inner = ".".join(rest[3:-1])
                    new = f"{side}.mid.attn_1.{VAE_ATTENTION[inner]}.{rest[-1]}"
                    if value.ndim == 2:
                        value = value[:, :, None, None]
            elif rest[0] == "conv_norm_out":
                new = f"{side}.norm_out.{rest[-1]}"
        out["first_stage_model." + new] = value
    return out


def save_ldm_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """Writes the SD1.5-family pipeline in `folder` as one original-layout .safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    tensors = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block, len(unet.config.block_out_channels))
    tensors.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    # original checkpoints name the text weights text_model.* (transformers 5 drops that prefix in state_dict)
    tensors.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                    for k, v in text.state_dict().items()})  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)
