"""Image prompts on a diffusers pipeline the user already has.

    prompter = ImagePrompter(pipe, adapter, encoder)          # attaches the adapter to pipe.unet
    images = prompter(image=reference, prompt="on the beach", scale=0.6, generator=g).images
    prompter.detach()

The prompter encodes the reference(s), sets the image tokens for the batch the pipeline will run (one reference per
prompt, classifier-free guidance aware), calls the pipeline unchanged, and clears the tokens afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from PIL import Image

from .adapter import IPAdapter
from .encoders import ImageEncoder, check_encoder

ImageInput = Image.Image | torch.Tensor


def _as_list(images: ImageInput | Sequence[ImageInput] | None) -> list[ImageInput] | None:
    """A PIL image, a list of them, or precomputed features with a leading batch axis -> a list."""
    if images is None:
        return None
    if isinstance(images, Image.Image):
        return [images]
    return list(images)


class ImagePrompter:
    """Runs a diffusers Stable Diffusion / SDXL pipeline with an IP-Adapter image prompt."""

    def __init__(self, pipe, adapter: IPAdapter, encoder: ImageEncoder | None = None) -> None:
        if adapter.config.image_feature != "none":
            if encoder is None:
                raise ValueError(
                    f"this adapter ({adapter.config.variant}) reads {adapter.config.image_encoder_name}; pass the "
                    "matching ImageEncoder"
                )
            check_encoder(adapter.config, encoder)
        self.pipe = pipe
        self.adapter = adapter if adapter.attached else adapter.attach(pipe.unet)
        self.encoder = encoder

    def detach(self) -> None:
        self.adapter.detach()

    def _uses_cfg(self, guidance_scale: float) -> bool:
        # diffusers' rule (`do_classifier_free_guidance`): guidance > 1 and no guidance-embedding UNet.
        return guidance_scale > 1 and getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is None

    @torch.no_grad()
    def features(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Encoder features for the adapter: pooled (N, D) or penultimate (N, T, D)."""
        feature = self.adapter.config.image_feature
        if all(isinstance(i, torch.Tensor) for i in images):
            return torch.stack(list(images))  # precomputed features
        if self.encoder is None:
            raise ValueError("reference images need an ImageEncoder; pass one, or pass precomputed features")
        return self.encoder.encode(list(images), feature)

    @torch.no_grad()
    def tokens(
        self,
        images: Sequence[ImageInput] | None,
        negative_images: Sequence[ImageInput] | None = None,
        face_id: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) image tokens, one row per reference."""
        feature = self.adapter.config.image_feature
        cond_feats = self.features(images) if images is not None and feature != "none" else None
        n = cond_feats.shape[0] if cond_feats is not None else face_id.shape[0]  # type: ignore[union-attr]
        if negative_images is not None:
            uncond_feats = self.features(negative_images)
        elif cond_feats is not None and self.encoder is not None:
            uncond_feats = self.encoder.unconditional(feature, n)
        elif cond_feats is not None:  # precomputed features without an encoder: zeros, as pooled training drops
            uncond_feats = torch.zeros_like(cond_feats)
        else:
            uncond_feats = None
        cond = self.adapter.project(image=cond_feats, face_id=face_id)
        uncond = self.adapter.project(image=uncond_feats, face_id=None if face_id is None else torch.zeros_like(face_id))
        return cond, uncond

    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput] | None = None,
        prompt: str | list[str] = "",
        scale: float | Sequence[float] = 1.0,
        negative_image: ImageInput | Sequence[ImageInput] | None = None,
        face_id: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        start: float = 0.0,
        end: float = 1.0,
        **pipe_kwargs,
    ):
        """Calls the pipeline with the image prompt.

        Args:
            image: one reference for every prompt, or one per prompt (per-sample references in one batch).
            prompt: text prompt(s); "" for image-only prompting.
            scale: λ for every layer, or one per adapted layer.
            negative_image: image(s) used as the unconditional image prompt instead of the empty one.
            face_id: (N, 512) ArcFace embeddings for FaceID adapters.
            guidance_scale: classifier-free guidance scale (default: the pipeline's own default).
            num_images_per_prompt: images per prompt, passed to the pipeline.
            start: the image prompt acts from this fraction of the denoising schedule on ...
            end: ... up to this fraction (step i of N acts when start <= i/N and (i+1)/N <= end).
            **pipe_kwargs: anything else the pipeline takes (negative_prompt, num_inference_steps, generator, ...).

        Returns:
            the pipeline's output.
        """
        if guidance_scale is None:
            guidance_scale = inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        cond, uncond = self.tokens(_as_list(image), _as_list(negative_image), face_id)
        if cond.shape[0] == 1 and len(prompts) > 1:
            cond, uncond = cond.expand(len(prompts), -1, -1), uncond.expand(len(prompts), -1, -1)
        if cond.shape[0] != len(prompts):
            raise ValueError(f"expected one reference image or one per prompt ({len(prompts)}), found {cond.shape[0]}")
        self.adapter.set_tokens(cond, uncond if self._uses_cfg(guidance_scale) else None)
        self.adapter.set_scale(scale)
        self.adapter.state.set_window(start, end)
        hook = self.pipe.unet.register_forward_pre_hook(self._track_step, with_kwargs=True)
        try:
            return self.pipe(
                prompt=prompts if not isinstance(prompt, str) else prompt,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt,
                **pipe_kwargs,
            )
        finally:
            hook.remove()
            self.adapter.state.clear()
            self.adapter.state.progress = None
            self.adapter.state.set_window()

    def _track_step(self, module, args, kwargs) -> None:
        """Before each UNet call: which step of the scheduler's full schedule this is (for the step window)."""
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if t is None or timesteps is None or len(timesteps) == 0:
            return
        t = torch.as_tensor(t).flatten()[0].to(timesteps.device, timesteps.dtype)
        match = (timesteps == t).nonzero()
        if len(match):
            self.adapter.state.progress = (int(match[0, 0]), len(timesteps))
