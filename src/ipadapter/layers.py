"""Where an IP-Adapter plugs into a UNet: its attention layers, in the order official checkpoints number them.

Official checkpoints number layers by position in `unet.attn_processors` (diffusers order: down blocks, up blocks,
mid block; attn1 before attn2 inside each transformer block). Cross-attention layers (attn2) carry the
`to_k_ip`/`to_v_ip` weights, so cross-attention layer i has official index 2i+1 and its self-attention partner 2i.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of a UNet."""

    name: str  # processor name without ".processor", e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    index: int  # position in unet.attn_processors = the official checkpoint index
    hidden_size: int  # query width (the layer's to_q input features)
    context_dim: int  # key/value input width (cross_attention_dim for attn2, hidden_size for attn1)
    is_cross: bool  # True for cross-attention (attn2)
    module: nn.Module  # the diffusers Attention module


def attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """Every attention module of `unet` in `attn_processors` order (the official index order)."""
    if not hasattr(unet, "attn_processors"):
        raise ValueError(f"expected a diffusers UNet with `attn_processors`, found {type(unet).__name__}")
    # torch.compile(unet) wraps the UNet (its submodules' names then start with "_orig_mod."); the layers are the
    # wrapped UNet's own, so an adapter attaches the same before or after compiling
    unet = getattr(unet, "_orig_mod", unet)
    modules = dict(unet.named_modules())
    layers = []
    for index, proc_name in enumerate(unet.attn_processors):
        name = proc_name.removesuffix(".processor")
        attn = modules[name]
        is_cross = bool(getattr(attn, "is_cross_attention", name.endswith("attn2")))
        layers.append(
            AttentionLayer(
                name=name,
                index=index,
                hidden_size=attn.to_q.in_features,
                context_dim=attn.to_k.in_features,
                is_cross=is_cross,
                module=attn,
            )
        )
    return layers


def cross_attention_layers(unet: nn.Module) -> list[AttentionLayer]:
    """The cross-attention layers an IP-Adapter adapts, checked against the official 2i+1 numbering."""
    layers = attention_layers(unet)
    cross = [layer for layer in layers if layer.is_cross]
    for i, layer in enumerate(cross):
        if layer.index != 2 * i + 1:
            raise ValueError(
                f"cross-attention layer {layer.name} sits at attn_processors index {layer.index}, expected {2 * i + 1}: "
                "this UNet does not interleave self- and cross-attention like Stable Diffusion, so official "
                "IP-Adapter layer numbering does not apply to it"
            )
    if not cross:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers; an IP-Adapter needs at least one")
    return cross
