"""The IP-Adapter module: an image projection plus the decoupled attention weights of every cross-attention layer.

    adapter = IPAdapter.from_file("ip-adapter_sd15.safetensors")   # any official layout, or ours
    adapter.attach(pipe.unet)                                        # validated before anything changes
    adapter.set_tokens(adapter.project(image=embeds), uncond=...)    # or the higher-level pipeline helpers
    ...
    adapter.detach()                                                 # the UNet is exactly as before

Parameter names: `image_proj.*` (official projection names), `layers.{i}.to_k_ip/to_v_ip.weight` for
cross-attention layer i, and `lora.{j}.to_{q,k,v,out}_lora.{down,up}.weight` for attention layer j (FaceID).
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .attention import DecoupledAttnProcessor, ImageBranch, IPLayer
from .blocks import layer_weights
from .config import AdapterConfig, ResamplerConfig, base_family, image_encoder_name
from .layers import AttentionLayer, attention_layers, cross_attention_layers
from .lora import AttentionLoRA, hook_lora, hooks_in_place
from .projection import build_projection
from .state import PromptState
from .variants import get_variant


class IPAdapter(nn.Module):
    """Image projection + per-layer `to_k_ip`/`to_v_ip` (+ FaceID LoRA), attachable to a diffusers UNet."""

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.image_proj = build_projection(config)
        # concat adapters (the paper's simple-adapter ablation) add no keys/values: their tokens join the text tokens
        decoupled = config.attention == "decoupled"
        self.layers = nn.ModuleList(IPLayer(config.cross_attention_dim, h) for h in config.layer_hidden_sizes if decoupled)
        self.lora = (
            nn.ModuleList(
                AttentionLoRA(h, config.cross_attention_dim if j % 2 else h, config.lora_rank)
                for j, h in enumerate(config.lora_hidden_sizes)
            )
            if config.lora_rank
            else None
        )
        self.state = PromptState(config.num_layers)
        self._processors: list[tuple[nn.Module, DecoupledAttnProcessor]] = []  # (attention module, processor)
        self.layer_names: list[str] = []  # the adapted cross-attention layers of the UNet it is attached to
        self._concat_hook = None  # concat adapters: the UNet pre-hook that appends the image tokens
        self._unet: weakref.ref | None = None  # the UNet attached to (a weak reference: not a submodule)
        # FaceID: the LoRA's hooks on every attention layer's q/k/v/out (a processor that bypasses those Linear layers,
        # e.g. fuse_qkv_projections()' fused one, replaces the cross-attention layers' processors too, which
        # `check_attached` reports)
        self._lora_hooks: list = []

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        variant: str = "base",
        image_embed_dim: int | None = None,
        init_from_unet: bool = True,
    ) -> IPAdapter:
        """A new adapter of `variant` sized for `unet`.

        Args:
            unet: the diffusers UNet it will be trained on.
            variant: a name from `ipadapter.variants.VARIANTS` ("base", "plus", "full", "faceid", "sd15", ...).
            image_embed_dim: width of the encoder output the projection consumes (pooled projection_dim for
                pooled variants, hidden_size for penultimate ones). Defaults to the variant's official width.
            init_from_unet: copy each layer's `to_k`/`to_v` into `to_k_ip`/`to_v_ip` (paper §3.2: "to speed up the
                convergence"); otherwise they keep PyTorch's default init.
        """
        v = get_variant(variant)
        cross = cross_attention_layers(unet)
        cross_dim = int(unet.config.cross_attention_dim)
        embed_dim = image_embed_dim if image_embed_dim is not None else v.image_embed_dim
        if v.family in ("SD1.5", "SDXL"):  # an official layout's name: the adapter would carry it, so it must be one
            found = base_family(cross_dim, len(cross))
            generic = "a generic variant (base, plus, full, faceid, ...)"
            if found != v.family:
                raise ValueError(f"variant {variant!r} is the official {v.family} layout; this UNet is {found}: use "
                                 f"{generic}, sized from the UNet")  # fmt: skip
            if v.image_embed_dim and embed_dim != v.image_embed_dim:
                raise ValueError(
                    f"variant {variant!r} reads {v.image_embed_dim}-d {v.image_feature} features "
                    f"({image_encoder_name(v.image_feature, v.image_embed_dim)}); the image encoder gives {embed_dim}-d "
                    f"({image_encoder_name(v.image_feature, embed_dim)}): use the variant of that encoder, or {generic}"
                )
        if v.image_feature != "none" and not embed_dim:
            raise ValueError(f"variant {variant!r} needs image_embed_dim (the image encoder's output width), found None")
        num_tokens = v.num_tokens  # 0 for "full": one token per encoder token, known only at run time
        resampler = None
        if v.projection in ("resampler", "faceid_plus"):
            dim = v.resampler_dim or cross_dim
            heads = v.resampler_heads or max(1, dim // 64)
            resampler = ResamplerConfig(dim=dim, depth=4, dim_head=64, heads=heads, ff_mult=4)
        lora_sizes: tuple[int, ...] = ()
        if v.lora_rank:
            lora_sizes = tuple(layer.hidden_size for layer in attention_layers(unet))
        config = AdapterConfig(
            projection=v.projection,
            num_tokens=num_tokens,
            cross_attention_dim=cross_dim,
            layer_hidden_sizes=tuple(layer.hidden_size for layer in cross),
            image_feature=v.image_feature,
            image_embed_dim=embed_dim if v.image_feature != "none" else 0,
            id_embed_dim=v.id_embed_dim,
            id_hidden_dim=2 * v.id_embed_dim,
            resampler=resampler,
            lora_rank=v.lora_rank,
            lora_hidden_sizes=lora_sizes,
            shortcut=v.shortcut,
            attention=v.attention,
            variant=variant,
        )
        adapter = cls(config)
        if init_from_unet:
            adapter.init_from_unet(unet)
        return adapter

    @torch.no_grad()
    def init_from_unet(self, unet: nn.Module) -> None:
        """to_k_ip / to_v_ip start as copies of each cross-attention layer's to_k / to_v (paper §3.2)."""
        cross = self._check_unet(unet)
        for ip_layer, layer in zip(self.layers, cross):
            ip_layer.to_k_ip.weight.copy_(layer.module.to_k.weight)
            ip_layer.to_v_ip.weight.copy_(layer.module.to_v.weight)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> IPAdapter:
        """Loads any official layout (.bin / .safetensors) or the project's own format; see `checkpoint.load_adapter`."""
        from .checkpoint import load_adapter

        return load_adapter(path, **kwargs)

    def save(self, path: str | os.PathLike, layout: str = "ipadapter") -> None:
        """Saves to the project's self-describing safetensors (`layout="ipadapter"`) or the official layout."""
        from .checkpoint import save_adapter

        save_adapter(self, path, layout=layout)

    # ---- attaching ----------------------------------------------------------------------------------------------
    def _check_unet(self, unet: nn.Module) -> list[AttentionLayer]:
        """Validates that this adapter fits `unet`; returns its cross-attention layers. Changes nothing."""
        cfg = self.config
        if isinstance(getattr(unet.config, "cross_attention_dim", None), (list, tuple)):
            raise ValueError("UNets with per-block cross_attention_dim are not supported")
        cross = cross_attention_layers(unet)
        unet_cross_dim = int(getattr(unet.config, "cross_attention_dim", -1))
        if len(cross) != cfg.num_layers or unet_cross_dim != cfg.cross_attention_dim:
            from .config import base_family

            def named(family: str, layers: int, width: int) -> str:  # custom families already carry the numbers
                return family if family.startswith("custom") else \
                    f"{family} ({layers} cross-attention layers, context width {width})"  # fmt: skip

            raise ValueError(
                f"this adapter is for {named(cfg.base_family, cfg.num_layers, cfg.cross_attention_dim)}; the UNet is "
                f"{named(base_family(unet_cross_dim, len(cross)), len(cross), unet_cross_dim)}"
            )
        for i, layer in enumerate(cross):
            if layer.hidden_size != cfg.layer_hidden_sizes[i] or layer.context_dim != cfg.cross_attention_dim:
                raise ValueError(
                    f"cross-attention layer {i} ({layer.name}) has width {layer.hidden_size} and context "
                    f"{layer.context_dim}; the adapter expects {cfg.layer_hidden_sizes[i]} and {cfg.cross_attention_dim}"
                )
        if self.lora is not None:
            all_layers = attention_layers(unet)
            sizes = tuple(layer.hidden_size for layer in all_layers)
            if sizes != cfg.lora_hidden_sizes:
                raise ValueError(
                    f"the adapter's LoRA expects {len(cfg.lora_hidden_sizes)} attention layers of widths "
                    f"{cfg.lora_hidden_sizes[:4]}...; the UNet has {len(sizes)} of widths {sizes[:4]}..."
                )
            if any(getattr(layer.module, "fused_projections", False) for layer in all_layers):
                # diffusers' fused processors call to_qkv / to_kv, never the to_q / to_k / to_v the LoRA hooks are on
                raise ValueError("this UNet's attention projections are fused (fuse_qkv_projections()), which bypasses "
                                 "the q/k/v layers a FaceID adapter's LoRA acts on: unfuse_qkv_projections() first")
        return cross

    @property
    def attached(self) -> bool:
        return bool(self._processors) or self._concat_hook is not None

    def attach(self, unet: nn.Module) -> IPAdapter:
        """Installs this adapter's branches on every cross-attention layer of `unet` (and LoRA on every attention).

        Everything is checked first; on any mismatch a ValueError is raised and the UNet is left untouched. Several
        adapters can be attached to one UNet; each keeps its own tokens and scales. Returns self.
        """
        if self.attached:
            raise ValueError("this adapter is already attached; call detach() first")
        cross = self._check_unet(unet)
        _refuse_diffusers_ip_adapter(unet, cross)
        _warn_bypassed(cross)
        param = next(unet.parameters(), None)
        if param is not None and param.device.type != "meta":  # (meta: offloaded weights, e.g. accelerate's hooks)
            self.to(device=param.device)
        self._unet = weakref.ref(getattr(unet, "_orig_mod", unet))
        if self.config.attention == "concat":
            self.layer_names = [layer.name for layer in cross]
            self._concat_hook = unet.register_forward_pre_hook(self._append_tokens, with_kwargs=True)
            return self
        self.layer_names = [layer.name for layer in cross]
        for i, layer in enumerate(cross):
            module = layer.module
            processor = module.processor
            if not isinstance(processor, DecoupledAttnProcessor):
                processor = DecoupledAttnProcessor(previous=module.processor)
                module.set_processor(processor)
            processor.image_branches.append(ImageBranch(self, self.layers[i], i, self.state))
            self._processors.append((module, processor))
        if self.lora is not None:  # on every attention layer, self-attention included, as hooks (see `hook_lora`)
            for j, layer in enumerate(attention_layers(unet)):
                self._lora_hooks.append((layer, hook_lora(layer.module, self.lora[j])))
        return self

    def _append_tokens(self, module, args, kwargs):
        """concat adapters: UNet context (B, S, C) -> [text tokens, λ * image tokens] (B, S + T, C)."""
        state = self.state
        if not state.groups:
            state.tokens_for(0)  # the error that says how to set an image prompt
        group = state.groups[0]
        if len(state.groups) > 1 or group.mask is not None:
            raise ValueError("a concat adapter takes one plain image prompt: no masks, regions or second images")
        scales = set(state.layer_scales if group.layer_scales is None else group.layer_scales)
        if len(scales) > 1:
            raise ValueError("a concat adapter has one scale for every layer (its tokens join the UNet's own context)")
        scale = scales.pop()
        if scale == 0 or not state.in_window(group.window):
            return None
        context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        tokens = state.tokens_for(context.shape[0]).to(device=context.device, dtype=context.dtype)  # (B, T, C)
        context = torch.cat([context, scale * tokens], dim=1)  # (B, S + T, C)
        if "encoder_hidden_states" in kwargs:
            kwargs = {**kwargs, "encoder_hidden_states": context}
        else:
            args = (*args[:2], context, *args[3:])
        return args, kwargs

    def detach(self) -> None:
        """Removes this adapter's branches; layers left without branches get their previous processor back."""
        if self._concat_hook is not None:
            self._concat_hook.remove()
            self._concat_hook = None
        for module, processor in self._processors:
            processor.remove(self)
            if processor.empty and module.processor is processor:
                module.set_processor(processor.previous)
        self._processors = []
        for _, handles in self._lora_hooks:
            for handle in handles:
                handle.remove()
        self._lora_hooks = []
        self._unet = None
        self.state.clear()

    def check_attached(self, unet: nn.Module) -> None:
        """Raises a ValueError if this adapter does not act on `unet` now: detached, attached to another UNet (e.g.
        `pipe.unet` was replaced), or its attention processors replaced since it was attached (diffusers'
        `enable_attention_slicing()`, `fuse_qkv_projections()`, `set_attn_processor()`, `load_ip_adapter()` install
        their own): the image prompt would otherwise be silently missing from the images."""
        if not self.attached:
            raise ValueError(
                "this adapter is not attached (ImagePrompter.detach() or adapter.detach() removed it): create a new "
                "ImagePrompter, or adapter.attach(pipe.unet)"
            )
        attached_to = self._unet() if self._unet is not None else None
        if attached_to is not getattr(unet, "_orig_mod", unet):
            raise ValueError(
                "this adapter is attached to another UNet than this pipeline's (pipe.unet was replaced, or the "
                "adapter was attached elsewhere): adapter.detach(), then a new ImagePrompter on this pipeline"
            )
        for (module, processor), name in zip(self._processors, self.layer_names):
            if module.processor is not processor:
                raise ValueError(
                    f"the attention processor of {name} was replaced after this adapter was attached (it is now "
                    f"{type(module.processor).__name__}; diffusers' enable_attention_slicing(), "
                    "fuse_qkv_projections(), set_attn_processor() and load_ip_adapter() install their own): make such "
                    "calls before attaching, or detach() and attach again"
                )

        for layer, handles in self._lora_hooks:
            if not hooks_in_place(layer.module, handles):
                raise ValueError(
                    f"the q/k/v/out projections of {layer.name}, where this FaceID adapter's LoRA acts, were fused or "
                    "replaced after it was attached (e.g. a Linear layer assigned by hand): detach() and attach again"
                )

    def co_attached(self) -> set[nn.Module]:
        """The other adapters attached to the same attention layers as this one."""
        owners = {b.owner for _, p in self._processors for b in p.image_branches}
        return owners - {self}

    # ---- run-time inputs ----------------------------------------------------------------------------------------
    def project(self, image: torch.Tensor | None = None, face_id: torch.Tensor | None = None,
                s_scale: float | None = None) -> torch.Tensor:  # fmt: skip
        """Encoder features -> image tokens (B, T, cross_attention_dim). `s_scale`: FaceID-PlusV2 only, the weight of
        the face-structure branch (tokens = identity + s_scale * perceiver(identity, face crop); default 1)."""
        cfg = self.config
        if image is not None and cfg.image_embed_dim and image.shape[-1] != cfg.image_embed_dim:
            from .config import encoder_source

            raise ValueError(
                f"this adapter ({cfg.variant}) expects {cfg.image_embed_dim}-d {cfg.image_feature} features from "
                f"{encoder_source(cfg.image_feature, cfg.image_embed_dim)}; found {image.shape[-1]}-d features "
                f"({encoder_source(cfg.image_feature, image.shape[-1])})"
            )
        if face_id is not None and cfg.id_embed_dim and face_id.shape[-1] != cfg.id_embed_dim:
            raise ValueError(f"this adapter expects {cfg.id_embed_dim}-d face embeddings, found {face_id.shape[-1]}-d")
        param = next(self.image_proj.parameters(), None)
        if param is not None:  # features from an encoder on another device (e.g. the pipeline moved after attaching)
            image = None if image is None else image.to(param.device)
            face_id = None if face_id is None else face_id.to(param.device)
        if s_scale is not None:
            if not (cfg.projection == "faceid_plus" and cfg.shortcut):
                raise ValueError(f"s_scale weighs the face-structure branch of FaceID-PlusV2 adapters; this adapter "
                                 f"({cfg.variant}) has none")  # fmt: skip
            return self.image_proj(image=image, face_id=face_id, s_scale=float(s_scale))
        return self.image_proj(image=image, face_id=face_id)

    def set_tokens(self, cond: torch.Tensor | None, uncond: torch.Tensor | None = None) -> None:
        """Sets the image tokens the attached layers attend to (see `state.PromptState` for the batch rule)."""
        self.state.set_tokens(cond, uncond)

    def set_scale(
        self, scale: float | Sequence[float] | Mapping = 1.0, preset: str | None = None,
        composition_scale: float | None = None,
    ) -> None:  # fmt: skip
        """λ for every adapted layer: one number, one per layer, a diffusers block dict
        ({"up": {"block_0": [0.0, 1.0, 0.0]}}), or a named preset ("style", "composition", "ease_in", ...; see
        `blocks.PRESETS`) times `scale`. Dicts and presets need the adapter attached (they name UNet blocks)."""
        if preset is None and not isinstance(scale, Mapping):
            self.state.set_scale(scale)  # type: ignore[arg-type]
            return
        if not self.attached:
            raise ValueError("block dicts and presets name UNet blocks: attach the adapter to a UNet first")
        self.state.set_scale(layer_weights(self.layer_names, scale, preset, composition_scale))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# diffusers attention processors whose computation ours reproduces (their cross-attention is the same while an image
# prompt acts); any other processor is bypassed on those layers, which `_warn_bypassed` says
_REPRODUCED = {"AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0", "XFormersAttnProcessor",
               "DecoupledAttnProcessor"}  # fmt: skip


def _refuse_diffusers_ip_adapter(unet: nn.Module, cross: list[AttentionLayer]) -> None:
    """diffusers' own IP-Adapter (`pipe.load_ip_adapter`) and ours would both act on the same layers."""
    unet = getattr(unet, "_orig_mod", unet)
    loaded = getattr(getattr(unet, "config", None), "encoder_hid_dim_type", None) == "ip_image_proj" or any(
        type(layer.module.processor).__name__.startswith("IPAdapter") for layer in cross
    )
    if loaded:
        raise ValueError(
            "this UNet has diffusers' own IP-Adapter loaded (pipe.load_ip_adapter): call pipe.unload_ip_adapter() "
            "before attaching an ipadapter adapter"
        )


def _warn_bypassed(cross: list[AttentionLayer]) -> None:
    """Warns when cross-attention layers have processors whose own work (slicing, a custom computation) would not run
    while an image prompt acts there."""
    found = sorted({type(layer.module.processor).__name__ for layer in cross} - _REPRODUCED)
    if found:
        warnings.warn(
            f"the UNet's cross-attention layers use {', '.join(found)}; while an image prompt acts on a layer, "
            "ipadapter's processor computes its attention (diffusers' AttnProcessor2_0 plus the image branch), so "
            "what those processors do differently (e.g. slicing) does not apply there; they run again where no "
            "image prompt acts and after detach()",
            stacklevel=3,
        )
