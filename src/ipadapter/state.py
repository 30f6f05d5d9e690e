"""What an attached adapter feeds its attention layers at run time: image tokens, per-layer scales, a K/V cache.

The UNet never sees image tokens in its `encoder_hidden_states`; the adapter's processors read them from here. So
the text context is untouched (a ControlNet given the same prompt embeddings sees text only), and each adapter
keeps its own tokens, scales and cache.

Batch rule: `cond` holds N rows (one per prompt). A UNet batch of N*r rows gets each row repeated r times
(`num_images_per_prompt`, in diffusers' order p0,p0,p1,p1). When `uncond` is set, the UNet batch is a
classifier-free-guidance batch: its first half gets `uncond`, its second half `cond`, as diffusers pipelines
concatenate [negative, positive].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PromptState:
    """Run-time inputs of one adapter, shared by all of its attention processors."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.cond: torch.Tensor | None = None  # (N, T, C) image tokens of the positive branch
        self.uncond: torch.Tensor | None = None  # (N, T, C) tokens of the unconditional branch, or None (no CFG)
        self.layer_scales: list[float] = [1.0] * num_layers  # λ of each adapted layer
        self.window = (0.0, 1.0)  # active from/to these fractions of the denoising (official custom pipeline rule)
        self.progress: tuple[int, int] | None = None  # (step index, number of steps) of the current UNet call
        self.use_cache = True  # reuse image keys/values across denoising steps when no gradient is needed
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- tokens -------------------------------------------------------------------------------------------------
    def set_tokens(self, cond: torch.Tensor | None, uncond: torch.Tensor | None = None) -> None:
        """Sets the image tokens; `uncond` marks every UNet batch as a CFG batch [uncond half, cond half]."""
        if cond is not None and cond.ndim != 3:
            raise ValueError(f"image tokens must be (batch, tokens, dim), found shape {tuple(cond.shape)}")
        if uncond is not None:
            if cond is None:
                raise ValueError("unconditional image tokens were given without conditional ones")
            if uncond.shape != cond.shape:
                raise ValueError(
                    f"unconditional tokens {tuple(uncond.shape)} must match conditional tokens {tuple(cond.shape)}"
                )
        self.cond, self.uncond = cond, uncond
        self._cache.clear()

    def clear(self) -> None:
        self.set_tokens(None)

    def tokens_for(self, batch_size: int) -> torch.Tensor:
        """The (batch_size, T, C) tokens matching a UNet batch of `batch_size` rows (see module docstring)."""
        if self.cond is None:
            raise ValueError(
                "no image prompt is set on this attached adapter: run the pipeline through ImagePrompter, or call "
                "`adapter.set_tokens(...)` first; to run the plain model, `detach()` the adapter"
            )
        n = self.cond.shape[0]
        if self.uncond is None:
            if batch_size % n:
                raise ValueError(f"UNet batch of {batch_size} rows does not divide into the {n} image prompts set")
            return self.cond.repeat_interleave(batch_size // n, dim=0)
        if batch_size % (2 * n):
            raise ValueError(
                f"UNet batch of {batch_size} rows is not a CFG batch (2 x multiple of {n}) for the {n} image prompts "
                "set with unconditional tokens; set uncond=None when classifier-free guidance is off"
            )
        r = batch_size // (2 * n)
        return torch.cat([self.uncond.repeat_interleave(r, dim=0), self.cond.repeat_interleave(r, dim=0)])

    # ---- scales -------------------------------------------------------------------------------------------------
    def set_scale(self, scale: float | Sequence[float]) -> None:
        """One λ for every layer, or one per adapted layer (in attn_processors order)."""
        if isinstance(scale, (int, float)):
            self.layer_scales = [float(scale)] * self.num_layers
            return
        scales = [float(s) for s in scale]
        if len(scales) != self.num_layers:
            raise ValueError(f"expected one scale per adapted layer ({self.num_layers}), found {len(scales)}")
        self.layer_scales = scales

    # ---- step window ------------------------------------------------------------------------------------------
    def set_window(self, start: float = 0.0, end: float = 1.0) -> None:
        """The adapter acts only on steps i (of N) with start <= i/N and (i+1)/N <= end."""
        if not 0 <= start <= end <= 1:
            raise ValueError(f"expected 0 <= start <= end <= 1, found start={start}, end={end}")
        self.window = (float(start), float(end))

    def in_window(self) -> bool:
        if self.progress is None or self.window == (0.0, 1.0):
            return True
        i, n = self.progress
        start, end = self.window
        return start <= i / n and (i + 1) / n <= end

    # ---- key/value cache ----------------------------------------------------------------------------------------
    def cached(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.use_cache or torch.is_grad_enabled():
            return None
        return self._cache.get(key)

    def store(self, key: tuple, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.use_cache and not torch.is_grad_enabled():
            self._cache[key] = kv
