"""Image prompts on a diffusers pipeline the user already has.

    prompter = ImagePrompter(pipe, adapter, encoder)          # attaches the adapter to pipe.unet
    images = prompter(image=reference, prompt="on the beach", scale=0.6, generator=g).images
    images = prompter(image=[ref_a, ref_b], combine="average", preset="style", mask=mask).images
    prompter.detach()

Several adapters at once (e.g. a style adapter and a face adapter) take one `ImagePrompt` each:

    prompter = ImagePrompter(pipe, [style_adapter, face_adapter], [encoder, None])
    prompter(prompts=[ImagePrompt(image=painting, preset="style"), ImagePrompt(face_id=arcface)], prompt="...")

The prompter encodes the references, turns every control into token groups on each adapter (see
`state.PromptState`), calls the pipeline unchanged, and clears everything afterwards. The text path is untouched, so
a ControlNet or T2I-Adapter in the pipeline sees the text tokens only.

References per prompt: a single image (or precomputed feature tensor) serves every prompt; a list with one entry per
prompt gives each batch item its own reference; an entry that is itself a list holds several references for that
prompt, combined by `combine`. With one prompt, a flat list is several references for it.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .adapter import IPAdapter
from .blocks import PRECISE, layer_weights, precise_weights
from .combine import combine_features, concat_tokens
from .encoders import ImageEncoder, check_encoder
from .images import load_image, to_8bit
from .noise import noised_reference
from .references import prepare, tile_count
from .state import BatchLayout, TokenGroup, check_window

ImageInput = Image.Image | torch.Tensor
MaskInput = Image.Image | torch.Tensor | np.ndarray | str | Path


@dataclass
class ImagePrompt:
    """Everything one adapter is asked to carry in one pipeline call."""

    image: ImageInput | Sequence | None = None  # reference(s); see the module docstring for per-prompt rules
    scale: float | Sequence[float] | Mapping = 1.0  # λ: one number, one per layer, or a diffusers block dict
    preset: str | None = None  # per-block preset (blocks.PRESETS): "style", "composition", "ease_in", ...
    composition_scale: float | None = None  # composition weight of "style_and_composition" presets
    composition_image: ImageInput | Sequence | None = None  # with a style_and_composition preset: the layout image
    boost: float | None = None  # style_precise / composition_precise: λ of the reference as a negative (default: scale)
    scaling: str = "v"  # where λ acts: v (output, the paper's), kv, kv_penalty, k_mean_v_penalty (see docs/controls.md)
    combine: str = "concat"  # several references: concat / average / norm_average / add / subtract / max / min
    weights: Sequence[float] | None = None  # one weight per reference (same for every prompt)
    prep: str = "center_crop"  # reference preparation: center_crop / pad / squash / tiles
    image_mask: MaskInput | Sequence[MaskInput] | None = None  # which pixels of each reference the encoder sees
    negative_image: ImageInput | Sequence | None = None  # unconditional image prompt instead of the empty one
    negative_noise: float = 0.0  # > 0: the unconditional image is the reference with this much noise ("fade")
    mask: MaskInput | Sequence[MaskInput] | None = None  # where the prompt acts: one for all prompts or one each
    regions: Sequence[MaskInput] | None = None  # one mask per reference: each acts only inside its own (regional)
    start: float = 0.0  # acts from this fraction of the denoising ...
    end: float = 1.0  # ... up to this fraction
    # ArcFace embeddings for FaceID adapters: (512,), (N, 512) one per prompt, or (N or 1, K, 512): K faces of one
    # person per prompt, their tokens concatenated (plain FaceID / FaceID-Portrait, as the official multi-face input)
    face_id: torch.Tensor | None = None
    s_scale: float | None = None  # FaceID-PlusV2: weight of the face-structure branch (official s_scale; default 1)
    content_embeds: torch.Tensor | None = None  # InstantStyle: (D,) or (N, D) text embedding to remove (pooled only)
    content_scale: float = 1.0  # ... times this
    # with precomputed features and no ImageEncoder: the encoder's (1, ...) features of the empty image, for the
    # unconditional branch (`embeds.load_unconditional`); pooled features default to zeros without it
    unconditional: torch.Tensor | None = None


def _is_reference(x, feature_ndim: int) -> bool:
    return isinstance(x, (Image.Image, str, Path)) or (isinstance(x, torch.Tensor) and x.ndim == feature_ndim)


def references_per_prompt(images, n_prompts: int, feature_ndim: int = 1) -> list[list] | None:
    """Normalises reference input to one list of references per prompt (see the module docstring).

    `feature_ndim`: axes of one precomputed reference (1 for pooled (D,), 2 for penultimate (T, D)); a tensor with
    one more axis is a batch of them, one per prompt."""
    if images is None:
        return None
    if _is_reference(images, feature_ndim):
        return [[images]] * n_prompts
    if isinstance(images, torch.Tensor):  # a batch of precomputed features: one row per prompt
        images = list(images)
    items = list(images)
    if not items:
        raise ValueError("expected at least one reference image, found an empty list")
    if all(isinstance(x, (list, tuple)) for x in items):
        if len(items) != n_prompts:
            raise ValueError(f"expected one list of references per prompt ({n_prompts}), found {len(items)}")
        return [list(x) for x in items]
    if len(items) == n_prompts:
        return [[x] for x in items]
    if n_prompts == 1:
        return [items]
    raise ValueError(
        f"expected one reference image, or one per prompt ({n_prompts}), found {len(items)}; to give a prompt "
        "several references, pass a list of lists"
    )


def _scaled(image):
    """16-bit / float PIL images as 8-bit RGB over their range (PIL's conversion clips them); anything else as is."""
    if isinstance(image, Image.Image) and to_8bit(image) is not image:
        return to_8bit(image).convert("RGB")
    return image


def load_mask(mask: MaskInput) -> torch.Tensor:
    """A mask image / array / tensor -> (H, W) float in [0, 1] (white = the image prompt acts)."""
    if isinstance(mask, (str, Path)):
        mask = load_image(mask)
    if isinstance(mask, Image.Image):
        return torch.from_numpy(np.asarray(to_8bit(mask).convert("L"), dtype=np.float32) / 255.0)  # 16-bit: scaled
    tensor = torch.as_tensor(mask, dtype=torch.float32)
    if tensor.ndim == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 2:
        raise ValueError(f"a mask must be (height, width), found shape {tuple(tensor.shape)} (several masks: a list, or "
                         "an (N, height, width) / (N, 1, height, width) tensor or array)")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(f"mask values must be in [0, 1], found [{float(tensor.min())}, {float(tensor.max())}]")
    return tensor


def masks_tensor(mask, n_prompts: int) -> torch.Tensor | None:
    """One mask for all prompts, or one per prompt -> (1 or N, H, W). A stack of masks may be an (N, H, W) tensor or
    array, or diffusers' `IPAdapterMaskProcessor.preprocess` output (N, 1, H, W)."""
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))  # (a flipped array has negative strides)
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]  # (N, 1, H, W): one channel per mask
    if isinstance(mask, (list, tuple)):
        loaded = [load_mask(m) for m in mask]
        if len(loaded) not in (1, n_prompts):
            raise ValueError(f"expected one mask, or one per prompt ({n_prompts}), found {len(loaded)}")
        if len({tuple(m.shape) for m in loaded}) > 1:
            raise ValueError(f"masks must share one size, found {sorted({tuple(m.shape) for m in loaded})}")
        return torch.stack(loaded)
    if isinstance(mask, torch.Tensor) and mask.ndim == 3 and mask.shape[0] > 1:
        return torch.stack([load_mask(m) for m in mask])
    return load_mask(mask)[None]


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # UNet -> its generation lock
_LOCKS_GUARD = threading.Lock()


def generation_lock(unet: torch.nn.Module) -> threading.RLock:
    """The lock that makes `ImagePrompter` calls on one UNet take turns. The image prompt lives in the attached
    adapters' state (and diffusers' scheduler keeps its steps in the pipeline), so two threads generating at once on
    one pipeline (a web app serving two users) would mix their references or fail; with it the second call waits for
    the first. Re-entrant, so that a callback that generates in the same thread does not deadlock."""
    key = getattr(unet, "_orig_mod", unet)  # a compiled UNet's lock is its module's
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.RLock()
    return lock


class ImagePrompter:
    """Runs a diffusers Stable Diffusion / SDXL pipeline with IP-Adapter image prompts."""

    def __init__(self, pipe, adapter: IPAdapter | Sequence[IPAdapter],
                 encoder: ImageEncoder | None | Sequence[ImageEncoder | None] = None) -> None:  # fmt: skip
        adapters = [adapter] if isinstance(adapter, IPAdapter) else list(adapter)
        encoders = list(encoder) if isinstance(encoder, (list, tuple)) else [encoder] * len(adapters)
        if len(encoders) != len(adapters):
            raise ValueError(f"expected one image encoder per adapter ({len(adapters)}), found {len(encoders)}")
        for a, e in zip(adapters, encoders):
            # without an encoder, only precomputed features can be given (`features` says so for images)
            if a.config.image_feature != "none" and e is not None:
                check_encoder(a.config, e)
        self.pipe = pipe
        attached: list[IPAdapter] = []
        try:
            for a in adapters:
                if a.attached:  # attached by the caller: to this pipeline's UNet
                    a.check_attached(pipe.unet)
                else:
                    attached.append(a.attach(pipe.unet))
        except Exception:
            for a in attached:  # a later adapter did not fit: the UNet is left as it was
                a.detach()
            raise
        self.adapters = adapters
        self.encoders = encoders

    @property
    def adapter(self) -> IPAdapter:
        return self.adapters[0]

    @property
    def encoder(self) -> ImageEncoder | None:
        return self.encoders[0]

    def detach(self) -> None:
        for a in self.adapters:
            a.detach()

    def _check_attached(self) -> None:
        """Before a call: every adapter acts on `pipe.unet` (see `IPAdapter.check_attached`), on the UNet's device,
        and no other adapter without an image prompt sits on the same layers."""
        unet = self.pipe.unet
        for a in self.adapters:
            a.check_attached(unet)
        idle = {o for a in self.adapters for o in a.co_attached()} - set(self.adapters)
        idle = [o for o in idle if not o.state.groups]
        if idle:
            raise ValueError(
                f"another adapter ({', '.join(sorted(o.config.variant for o in idle))}) is attached to this pipeline's "
                "UNet with no image prompt for this call: detach it (its ImagePrompter's detach()), or run the "
                "adapters together through one ImagePrompter([adapter_a, adapter_b])"
            )
        param = next(unet.parameters(), None)
        if param is not None and param.device.type != "meta":  # e.g. pipe.to("cuda") after attaching
            for a in self.adapters:
                own = next(a.parameters(), None)
                if own is not None and own.device != param.device:
                    a.to(param.device)

    def batch_layout(self, images: int, call: dict) -> BatchLayout:
        """How the pipeline stacks its UNet batch for a call generating `images` images (`state.BatchLayout`), so that
        every chunk gets its own tokens: [uncond, cond] with classifier-free guidance and [cond] without it, also
        when a callback switches guidance off during the generation (diffusers' "dynamic CFG": the batch halves);
        perturbed-attention guidance (diffusers' PAG pipelines) adds a chunk of conditional rows, [uncond, cond, cond]
        or [cond, cond]; InstructPix2Pix stacks [cond, uncond, uncond] (text and image guidance)."""
        if "InstructPix2Pix" in type(self.pipe).__name__:
            return BatchLayout(images, {1: "c", 3: "cuu"})
        if hasattr(self.pipe, "_prepare_perturbed_attention_guidance"):  # diffusers' PAGMixin
            default = inspect.signature(self.pipe.__call__).parameters.get("pag_scale")
            pag_scale = call.get("pag_scale", 0.0 if default is None else default.default)
            # diffusers' `do_perturbed_attention_guidance`: a scale and at least one applied layer
            if pag_scale > 0 and len(getattr(self.pipe, "pag_applied_layers", None) or []) > 0:
                return BatchLayout(images, {1: "c", 2: "cc", 3: "ucc"})
        return BatchLayout(images, {1: "c", 2: "uc"})

    def _uses_cfg(self, guidance_scale: float) -> bool:
        # Whether the pipeline may stack an unconditional chunk. Not every pipeline skips guidance for a guidance-
        # embedding UNet (time_cond_proj_dim, LCM): StableDiffusionPipeline does, the ControlNet image-to-image and
        # inpainting pipelines (SD and SDXL, Union, PAG) do not. So the pipeline's own `do_classifier_free_guidance`
        # decides, read with this call's scale (pipelines without it: guidance_scale > 1). The batch layout still
        # reads the chunks from the UNet batch itself: one chunk gets the conditional tokens, two [uncond, cond].
        if guidance_scale <= 1:
            return False
        rule = getattr(type(self.pipe), "do_classifier_free_guidance", None)
        if not isinstance(rule, property) or rule.fget is None:
            return True
        missing = object()
        saved = self.pipe.__dict__.get("_guidance_scale", missing)
        self.pipe._guidance_scale = guidance_scale  # what the property reads (the pipeline sets it in its call)
        try:
            return bool(rule.fget(self.pipe))
        except Exception:  # a property reading call-time state this pipeline has not set: assume guidance
            return True
        finally:
            if saved is missing:
                del self.pipe.__dict__["_guidance_scale"]
            else:
                self.pipe._guidance_scale = saved

    # ---- encoding -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Sequence, slot: int = 0, prep: str = "center_crop", masks=None,
                 noise: float = 0.0) -> torch.Tensor:  # fmt: skip
        """Encoder features of references (images, files, or precomputed feature tensors) for adapter `slot`:
        pooled (K, D) or penultimate (K, T, D). "tiles" preparation turns one image into several references.
        `masks`: one for every reference or one each; the encoder sees the reference's normalised pixels times the
        mask (black hides), prepared like the reference (ComfyUI's encoder mask). `noise` > 0: each prepared square
        at the encoder's input size gets that much "fade" noise (`noise.noised_reference`), as ComfyUI's
        IPAdapterNoise noises the 224 x 224 crop, so the strength does not depend on the reference's size."""
        adapter, encoder = self.adapters[slot], self.encoders[slot]
        feature = adapter.config.image_feature
        loaded = [load_image(x) if isinstance(x, (str, Path)) else _scaled(x) for x in images]
        if all(isinstance(x, torch.Tensor) for x in loaded):
            if masks is not None:
                raise ValueError("image_mask hides pixels of reference images; precomputed features have none")
            return torch.stack(list(loaded))  # precomputed features
        if any(isinstance(x, torch.Tensor) for x in loaded):
            raise ValueError("references of one prompt must be all images or all precomputed features")
        if encoder is None:
            raise ValueError("reference images need an ImageEncoder; pass one, or pass precomputed features")
        size = int(encoder.model.config.image_size)
        if masks is not None:
            return encoder.encode(self._masked_pixels(loaded, masks, prep, size, encoder, noise), feature)
        if noise > 0:
            return encoder.encode([noised_reference(s, noise) for x in loaded for s in prepare(x, prep, size)], feature)
        prepared = loaded if prep == "center_crop" else [p for x in loaded for p in prepare(x, prep, size)]
        return encoder.encode(prepared, feature)

    @staticmethod
    def _masked_pixels(images: list, masks, prep: str, size: int, encoder: ImageEncoder,
                       noise: float = 0.0) -> torch.Tensor:  # fmt: skip
        """(K', 3, S, S) normalised pixels of the prepared references times their prepared masks."""
        masks = [load_mask(m) for m in (masks if isinstance(masks, (list, tuple)) else [masks])]
        if len(masks) not in (1, len(images)):
            raise ValueError(f"expected one image_mask, or one per reference ({len(images)}), found {len(masks)}")
        pixels, weights = [], []
        for i, image in enumerate(images):
            m = masks[min(i, len(masks) - 1)]
            mask = Image.fromarray((m.numpy() * 255).round().astype(np.uint8)).resize(image.size, Image.Resampling.BILINEAR)
            # the same geometry for both: centre crop (the encoder's processor does the image's, as unmasked) / pad
            # (the padding stays as it is) / squash / tiles
            shown = [image] if prep == "center_crop" and noise == 0 else prepare(image, prep, size)
            shown = [noised_reference(x, noise) for x in shown] if noise > 0 else shown
            seen = prepare(mask, prep, size, pad_color=(255, 255, 255))
            pixels.append(encoder.preprocess(shown))
            weights += [torch.from_numpy(np.asarray(s, dtype=np.float32)[..., 0] / 255.0) for s in seen]
        out = torch.cat(pixels)  # (K', 3, S, S)
        return out * torch.stack(weights)[:, None].to(out)  # (K', 1, S, S) broadcast over channels

    def _tiled_negatives(self, negatives: list, refs: list, slot: int) -> torch.Tensor:
        """With prep="tiles": each negative image encoded whole (the encoder's centre crop), standing for every tile
        of its reference, as ComfyUI_IPAdapter_plus's IPAdapterTiled gives its image_negative to every tile. (Tiled
        itself, a negative of another aspect ratio than its reference would give another number of tiles.)"""
        feats = self.features(negatives, slot, "center_crop")  # (one per negative, ...)
        if feats.shape[0] == 1:
            return feats  # expanded to every tile by the caller
        if feats.shape[0] != len(refs):
            raise ValueError(f"expected one negative image, or one per reference ({len(refs)}), found {feats.shape[0]}")
        loaded = [load_image(x) if isinstance(x, (str, Path)) else x for x in refs]
        counts = [tile_count(x.size) if isinstance(x, Image.Image) else 1 for x in loaded]  # features: not tiled
        return feats.repeat_interleave(torch.tensor(counts, device=feats.device), dim=0)

    @torch.no_grad()
    def _prompt_tokens(self, slot: int, refs: list | None, negatives: list | None, face: torch.Tensor | None,
                       p: ImagePrompt, row: int, cfg: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(cond, uncond) tokens (1, T, C) of one prompt row."""
        adapter, encoder = self.adapters[slot], self.encoders[slot]
        feature = adapter.config.image_feature
        cond_feats = uncond_feats = None
        if refs is not None and feature != "none":
            cond_feats = self.features(refs, slot, p.prep, p.image_mask)  # (K, ...)
            k = cond_feats.shape[0]
            if p.content_embeds is not None:
                if feature != "pooled":
                    raise ValueError(
                        "content subtraction (InstantStyle) works on global image embeddings only; this adapter "
                        f"({adapter.config.variant}) reads {feature} features"
                    )
                content = p.content_embeds.to(cond_feats)
                content = content[row] if content.ndim == 2 and content.shape[0] > 1 else content.reshape(-1)
                if content.shape[-1] != cond_feats.shape[-1]:
                    raise ValueError(f"content embedding is {content.shape[-1]}-d; the image embeddings are "
                                     f"{cond_feats.shape[-1]}-d (use the text tower paired with the image encoder)")  # fmt: skip
                cond_feats = cond_feats - p.content_scale * content
            if negatives is not None:
                uncond_feats = (self._tiled_negatives(negatives, refs, slot) if p.prep == "tiles"
                                else self.features(negatives, slot, p.prep))  # fmt: skip
                if uncond_feats.shape[0] == 1 and k > 1:
                    uncond_feats = uncond_feats.expand(k, *uncond_feats.shape[1:])
                if uncond_feats.shape != cond_feats.shape:
                    raise ValueError(f"negative image features {tuple(uncond_feats.shape)} do not match the "
                                     f"references' {tuple(cond_feats.shape)}")  # fmt: skip
            elif p.negative_noise > 0:
                images = [load_image(x) if isinstance(x, (str, Path)) else x for x in refs]
                if not all(isinstance(x, Image.Image) for x in images):
                    raise ValueError("negative_noise needs reference images, not precomputed features")
                uncond_feats = self.features(images, slot, p.prep, p.image_mask, noise=p.negative_noise)
            elif encoder is not None:
                uncond_feats = encoder.unconditional(feature, k).to(cond_feats)
            elif p.unconditional is not None:  # precomputed features, and the encoder's view of the empty image
                uncond = p.unconditional.to(cond_feats)
                if tuple(uncond.shape) not in ((1, *cond_feats.shape[1:]), tuple(cond_feats.shape[1:])):
                    raise ValueError(f"unconditional features {tuple(uncond.shape)} do not match the references' "
                                     f"{tuple(cond_feats.shape[1:])}")  # fmt: skip
                uncond_feats = uncond.reshape(1, *cond_feats.shape[1:]).expand_as(cond_feats)
            elif feature == "pooled" or not cfg:  # precomputed features without an encoder: zeros, as training
                uncond_feats = torch.zeros_like(cond_feats)  # dropped pooled ones (without guidance: unused)
            else:
                raise ValueError(
                    f"precomputed {feature} features without an ImageEncoder: the unconditional branch needs the "
                    "encoder's features of the empty image (a black image, not zeros); pass the encoder, or "
                    "unconditional= (embeddings files written by --save-embeds hold them: embeds.load_unconditional)"
                )
            cond_feats = combine_features(cond_feats, p.combine, p.weights)
            if negatives is None and p.negative_noise == 0:
                # the dropped image stays the dropped image whatever the mode (ComfyUI_IPAdapter_plus keeps
                # `img_uncond_embeds[0]`): "add" summed K copies of it, "subtract" cancelled it to zero features
                uncond_feats = uncond_feats[: cond_feats.shape[0]]
            else:
                uncond_feats = combine_features(uncond_feats, p.combine, None if negatives is None else p.weights)
        faces = None
        if face is not None:
            face = face.reshape(-1, face.shape[-1])  # (K, 512): K faces of one person, their tokens concatenated
            n = cond_feats.shape[0] if cond_feats is not None else 1
            faces = face if face.shape[0] > 1 else face.expand(n, -1)
        weight = {} if p.s_scale is None else {"s_scale": p.s_scale}  # the unconditional tokens too, as officially
        cond = adapter.project(image=cond_feats, face_id=faces, **weight)  # (K or 1, T, C)
        uncond = adapter.project(image=uncond_feats, face_id=None if faces is None else torch.zeros_like(faces),
                                 **weight)  # fmt: skip
        return concat_tokens(cond), concat_tokens(uncond)

    @torch.no_grad()
    def groups(self, slot: int, p: ImagePrompt, n_prompts: int, cfg: bool) -> list[TokenGroup]:
        """The token groups adapter `slot` gets for `p` in a call with `n_prompts` prompts."""
        segment = self.adapters[slot].config.num_tokens  # tokens per reference (concat puts K side by side)
        return [replace(g, scaling=p.scaling, segment=segment) for g in self._groups(slot, p, n_prompts, cfg)]

    def _groups(self, slot: int, p: ImagePrompt, n_prompts: int, cfg: bool) -> list[TokenGroup]:
        adapter = self.adapters[slot]
        check_window(p.start, p.end)
        if p.negative_image is not None and p.negative_noise > 0:
            raise ValueError("negative_image and negative_noise both choose the unconditional image prompt; pass one")
        if not cfg and (p.negative_image is not None or p.negative_noise > 0):
            given = "negative_image" if p.negative_image is not None else "negative_noise"
            raise ValueError(f"{given} sets the unconditional image prompt, which only classifier-free guidance uses, "
                             "and guidance_scale <= 1 turns it off (as does a guidance-embedding UNet such as an LCM's "
                             "in this pipeline, which takes the scale as an input): raise guidance_scale, or leave it "
                             "out")  # fmt: skip
        if p.prep == "tiles" and p.weights is not None and p.regions is None:  # (with regions: one λ per region)
            raise ValueError("weights are per reference image, and tiles turn one image into several: pass weights "
                             "without prep='tiles', or tile the images yourself and weight the tiles")  # fmt: skip
        ndim = 2 if adapter.config.image_feature == "penultimate" else 1
        refs = references_per_prompt(p.image, n_prompts, ndim)
        negatives = references_per_prompt(p.negative_image, n_prompts, ndim)
        if refs is None and adapter.config.image_feature != "none":
            raise ValueError(f"this adapter ({adapter.config.variant}) needs a reference image")
        if adapter.config.image_feature == "none" and (refs is not None or negatives is not None
                                                       or p.composition_image is not None):  # fmt: skip
            raise ValueError(f"this adapter ({adapter.config.variant}) reads face embeddings only: reference images "
                             "(image, negative_image, composition_image) would be ignored; leave them out")  # fmt: skip
        faces = None
        if p.face_id is not None and not adapter.config.id_embed_dim:
            raise ValueError(f"face_id was given but this adapter ({adapter.config.variant}) takes no face embeddings; "
                             "use a FaceID adapter, or leave face_id out")  # fmt: skip
        if p.face_id is not None:
            faces = p.face_id if p.face_id.ndim == 3 else p.face_id.reshape(-1, 1, p.face_id.shape[-1])  # (N, K, 512)
            if faces.shape[0] not in (1, n_prompts):
                raise ValueError(f"expected one face embedding, or one per prompt ({n_prompts}), found {faces.shape[0]}")
            if faces.shape[1] > 1 and adapter.config.image_feature != "none":
                raise ValueError(f"this adapter ({adapter.config.variant}) takes one face embedding per prompt with its "
                                 f"reference image; found {faces.shape[1]} (several faces of one person: plain FaceID "
                                 "or FaceID-Portrait adapters)")  # fmt: skip
        elif adapter.config.id_embed_dim:
            raise ValueError(f"this adapter ({adapter.config.variant}) needs face_id: (512,) ArcFace embeddings")

        def tokens(references) -> tuple[torch.Tensor, torch.Tensor]:
            rows, seen = [], {}
            for i in range(n_prompts):
                ref = None if references is None else references[i]
                neg = None if negatives is None else negatives[i]
                face = None if faces is None else faces[min(i, faces.shape[0] - 1)]
                # one reference shared by every prompt is encoded once
                key = (id(ref), id(neg), None if face is None else min(i, faces.shape[0] - 1),
                       i if p.content_embeds is not None else None)  # fmt: skip
                if key not in seen:
                    seen[key] = self._prompt_tokens(slot, ref, neg, face, p, i, cfg)
                rows.append(seen[key])
            if len({r[0].shape for r in rows}) > 1:
                raise ValueError("with combine='concat' every prompt needs the same number of references; found "
                                 f"token counts {[r[0].shape[1] for r in rows]}")  # fmt: skip
            return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

        mask = masks_tensor(p.mask, n_prompts)
        if p.regions is not None:
            return self._region_groups(slot, p, refs, n_prompts, cfg, negatives)
        cond, uncond = tokens(refs)
        names = adapter.layer_names
        window = (float(p.start), float(p.end))
        two_images = p.composition_image is not None
        if two_images:
            if p.preset not in ("style_and_composition", "strong_style_and_composition"):
                raise ValueError("composition_image needs preset 'style_and_composition' or "
                                 f"'strong_style_and_composition', found {p.preset!r}")  # fmt: skip
            # the preset's own weights split by role (its composition layers at 0, then everything else at 0), so
            # the two groups add up to the one-image preset (SD1.5's strong preset has no quarter at t 4)
            comp_scale = p.composition_scale if p.composition_scale is not None else p.scale
            style = layer_weights(names, p.scale, p.preset, 0.0)
            composition = layer_weights(names, 0.0, p.preset, comp_scale)
            comp_cond, comp_uncond = tokens(references_per_prompt(p.composition_image, n_prompts, ndim))
            return [TokenGroup(cond, uncond if cfg else None, style, window, mask),
                    TokenGroup(comp_cond, comp_uncond if cfg else None, composition, window, mask)]  # fmt: skip
        if p.preset in PRECISE:
            if not isinstance(p.scale, (int, float)):
                raise ValueError(f"a preset takes one number as scale, found {type(p.scale).__name__}")
            positive, negative = precise_weights(names, p.preset, float(p.scale), p.boost)
            groups = [TokenGroup(cond, uncond if cfg else None, positive, window, mask)]
            if cfg:  # the reference on the unconditional side of those layers (no CFG: nothing to push from)
                groups.append(TokenGroup(torch.zeros_like(cond), cond, negative, window, mask))
            return groups
        scales = layer_weights(names, p.scale, p.preset, p.composition_scale)
        return [TokenGroup(cond, uncond if cfg else None, scales, window, mask)]

    def _region_groups(self, slot: int, p: ImagePrompt, refs: list[list] | None, n_prompts: int, cfg: bool,
                       negatives: list[list] | None = None) -> list[TokenGroup]:  # fmt: skip
        """Regional prompting: reference j of every prompt acts only inside regions[j] (times weights[j]). Its
        groups are those of an image prompt with reference j alone and regions[j] as its mask (a precise preset's
        unconditional-side group included), their layer scales times weights[j]; per-reference encoder masks and
        negative images (one per reference) go with their reference."""
        if p.mask is not None or p.composition_image is not None:
            raise ValueError("regions (one mask per reference) cannot be combined with mask or composition_image")
        regions = list(p.regions or [])
        counts = {len(r) for r in refs or []}
        if counts != {len(regions)}:
            raise ValueError(f"regions need one mask per reference: {len(regions)} masks, references per prompt "
                             f"{sorted(counts)}")  # fmt: skip
        weights = list(p.weights) if p.weights is not None else [1.0] * len(regions)
        if len(weights) != len(regions):
            raise ValueError(f"expected one weight per reference ({len(regions)}), found {len(weights)}")
        own_negatives = negatives is not None and len(regions) > 1 and {len(x) for x in negatives} == {len(regions)}
        single = replace(p, regions=None, weights=None)  # `combine` stays: it mixes the tiles of one reference
        groups = []
        for j, region in enumerate(regions):
            single_j = replace(single, image=[[r[j]] for r in refs or []], mask=region)
            if isinstance(p.image_mask, (list, tuple)) and len(p.image_mask) == len(regions) > 1:
                single_j = replace(single_j, image_mask=p.image_mask[j])  # reference j's own encoder mask
            if own_negatives:
                single_j = replace(single_j, negative_image=[[x[j]] for x in negatives])  # and its own negative
            for group in self._groups(slot, single_j, n_prompts, cfg):
                groups.append(replace(group, layer_scales=[s * weights[j] for s in group.layer_scales]))
        return groups

    # ---- running --------------------------------------------------------------------------------------------------
    def __call__(
        self,
        image: ImageInput | Sequence | None = None,
        prompt: str | list[str] | None = "",
        scale: float | Sequence[float] | Mapping | None = None,
        negative_image: ImageInput | Sequence | None = None,
        face_id: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        start: float | None = None,
        end: float | None = None,
        prompts: Sequence[ImagePrompt] | None = None,
        **controls,
    ):
        """Calls the pipeline with the image prompt(s).

        Args:
            image: reference(s): one for every prompt, one per prompt, or lists of several (module docstring).
            prompt: text prompt(s); "" for image-only prompting (leave it out when passing `prompt_embeds`).
            scale: λ for every layer, one per adapted layer, or a diffusers block dict (default 1).
            negative_image: image(s) used as the unconditional image prompt instead of the empty one (only
                classifier-free guidance reads it: refused with guidance_scale <= 1).
            face_id: ArcFace embeddings for FaceID adapters: (512,), (N, 512) one per prompt, or (N, K, 512) with K
                faces of one person per prompt (see `ImagePrompt.face_id`).
            guidance_scale: classifier-free guidance scale (default: the pipeline's own default).
            num_images_per_prompt: images per prompt, passed to the pipeline.
            start: the image prompt acts from this fraction of the denoising schedule on (default 0) ...
            end: ... up to this fraction (default 1; step i of N acts when start <= i/N and (i+1)/N <= end).
            prompts: one `ImagePrompt` per adapter (instead of the arguments above), for several adapters.
            **controls: other `ImagePrompt` fields (preset, combine, weights, mask, regions, prep, image_mask,
                negative_noise, composition_image, composition_scale, boost, scaling, content_embeds, content_scale,
                s_scale, unconditional); everything else goes to
                the pipeline (negative_prompt, num_inference_steps, generator, control_image, mask_image, ...).
                The pipeline's own `image` (image-to-image start, ControlNet condition) is `pipeline_image=`, or
                `image=` when `prompts` is given.

        Returns:
            the pipeline's output.
        """
        with generation_lock(self.pipe.unet):  # one generation at a time per UNet (see `generation_lock`)
            return self._call(image, prompt, scale, negative_image, face_id, guidance_scale, num_images_per_prompt,
                              start, end, prompts, controls)

    def _call(self, image, prompt, scale, negative_image, face_id, guidance_scale, num_images_per_prompt, start, end,
              prompts, controls):  # fmt: skip
        fields = set(ImagePrompt.__dataclass_fields__)
        prompt_controls = {k: controls.pop(k) for k in list(controls) if k in fields}
        if "pipeline_image" in controls:  # the pipeline's own `image` (img2img start, ControlNet condition)
            controls["image"] = controls.pop("pipeline_image")
        if prompts is None:
            prompts = [ImagePrompt(image=image, scale=1.0 if scale is None else scale, negative_image=negative_image,
                                   face_id=face_id, start=0.0 if start is None else start,
                                   end=1.0 if end is None else end, **prompt_controls)]  # fmt: skip
        else:
            single = {"negative_image": negative_image, "face_id": face_id, "scale": scale, "start": start, "end": end}
            given = sorted([k for k, v in single.items() if v is not None] + list(prompt_controls))
            if given:
                raise ValueError(f"pass either `prompts` (one ImagePrompt per adapter, each with its own settings) or "
                                 f"the single-adapter arguments; found both (prompts and {', '.join(given)})")  # fmt: skip
            if image is not None:  # with `prompts`, `image` is the pipeline's own argument
                controls["image"] = image
        if len(prompts) != len(self.adapters):
            raise ValueError(f"expected one ImagePrompt per adapter ({len(self.adapters)}), found {len(prompts)}")
        params = inspect.signature(self.pipe.__call__).parameters
        if any(q.kind == inspect.Parameter.VAR_KEYWORD for q in params.values()):
            # diffusers' pipelines take **kwargs (for deprecated callbacks) and ignore the rest: a misspelt control
            # would be dropped silently
            unknown = sorted(k for k in controls if k not in params and k not in ("callback", "callback_steps"))
            if unknown:
                raise ValueError(f"unknown argument(s) {', '.join(unknown)}: neither an ImagePrompt field nor a "
                                 f"parameter of {type(self.pipe).__name__}")  # fmt: skip
        self._check_attached()
        if prompt == "" and controls.get("prompt_embeds") is not None:  # (diffusers refuses a prompt beside them)
            prompt = None
        if guidance_scale is None:
            guidance_scale = inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default
        if prompt is None:  # prompt_embeds given instead: one image prompt row per embedding row
            embeds = controls.get("prompt_embeds")
            n_prompts = 1 if embeds is None else int(embeds.shape[0])
        else:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        cfg = self._uses_cfg(guidance_scale)
        layout = self.batch_layout(n_prompts * num_images_per_prompt, controls)
        try:
            for slot, p in enumerate(prompts):
                self.adapters[slot].state.set_groups(self.groups(slot, p, n_prompts, cfg))
                self.adapters[slot].state.layout = layout
            # the step is tracked only where a step window needs it (a few tensor ops per step), the latent's size
            # where a mask does (its grid at each layer)
            hook = None
            if any(a.state.windowed or any(g.mask is not None for g in a.state.groups) for a in self.adapters):
                # prepend: before the UNet's other pre-hooks, e.g. a concat adapter's `_append_tokens` (registered
                # at attach), which decides from the step whether its tokens join the context of this UNet call
                hook = self.pipe.unet.register_forward_pre_hook(self._track_step, with_kwargs=True, prepend=True)
                for a in self.adapters:
                    a.state.step_tracked = True
            try:
                return self.pipe(
                    prompt=prompt,
                    guidance_scale=guidance_scale,
                    num_images_per_prompt=num_images_per_prompt,
                    **controls,
                )
            finally:
                if hook is not None:
                    hook.remove()
        finally:
            for a in self.adapters:
                a.state.clear()
                a.state.layout = None
                a.state.progress = None
                a.state.latent_size = None
                a.state.step_tracked = False

    def _track_step(self, module, args, kwargs) -> None:
        """Before each UNet call: the latent's (H, W) (for masks) and which step of the scheduler's full schedule this
        is (for step windows)."""
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            size = (int(sample.shape[-2]), int(sample.shape[-1]))
            for a in self.adapters:
                a.state.latent_size = size
        if not any(a.state.windowed for a in self.adapters):
            return
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if t is None or timesteps is None or len(timesteps) == 0:
            return
        t = torch.as_tensor(t).flatten()[0].to(timesteps.device, timesteps.dtype)
        match = (timesteps == t).nonzero().flatten().tolist()
        if len(match) > 1:
            # a timestep the schedule holds more than once (Heun: t0, t1, t1, t2, t2, ...): the first occurrence
            # after the previous UNet call's (from the scheduler's begin index on the first call, img2img's start)
            previous = self.adapters[0].state.progress
            after = previous[0] + 1 if previous is not None else (getattr(self.pipe.scheduler, "begin_index", None) or 0)
            match = [i for i in match if i >= after] or match
        if match:
            progress = (match[0], len(timesteps))
            for a in self.adapters:
                a.state.progress = progress
