"""What an attached adapter feeds its attention layers at run time: image tokens, per-layer scales, masks, a cache.

The UNet never sees image tokens in its `encoder_hidden_states`; the adapter's processors read them from here. So
the text context is untouched (a ControlNet given the same prompt embeddings sees text only), and each adapter
keeps its own tokens, scales and cache.

An adapter can carry several *token groups* at once. Each group is attended separately with the same query and
added (eq. 5 with one term per group): a plain image prompt is one group; a style image and a composition image
are two groups with different per-layer scales; regional prompts are groups with masks. A group's own layer scales
and step window default to the adapter's (`set_scale`, `set_window`).

Batch rule: a group's `cond` holds N rows (one per prompt). A UNet batch of N*r rows gets each row repeated r times
(`num_images_per_prompt`, in diffusers' order p0,p0,p1,p1). When `uncond` is set, the UNet batch is a
classifier-free-guidance batch: its first half gets `uncond`, its second half `cond`, as diffusers pipelines
concatenate [negative, positive]. Masks (N or 1 rows) follow the same rule, the same mask in both halves.
A caller that knows how its pipeline stacks the UNet batch sets a `BatchLayout` instead (`ImagePrompter` does):
equal chunks of M rows (M = prompts x images per prompt), each unconditional or conditional, chosen by the number of
chunks in a call: perturbed-attention guidance's [uncond, cond, cond], InstructPix2Pix's [cond, uncond, uncond], or
a guidance switched off by a callback during the generation (one chunk from then on).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


SCALINGS = ("v", "kv", "kv_penalty", "k_mean_v_penalty")  # ComfyUI_IPAdapter_plus's embeds_scaling modes


@dataclass
class TokenGroup:
    """One set of image tokens an adapter attends to, with where, when and how strongly it acts."""

    cond: torch.Tensor  # (N, T, C) tokens of the positive branch, one row per prompt
    uncond: torch.Tensor | None = None  # (N, T, C) tokens of the unconditional branch, or None (no CFG)
    layer_scales: Sequence[float] | None = None  # λ per adapted layer; None: the adapter's
    window: tuple[float, float] | None = None  # (start, end) fractions of the denoising; None: the adapter's
    mask: torch.Tensor | None = None  # (N or 1, H, W) in [0, 1]: where in the image this group acts; None: everywhere
    scaling: str = "v"  # where λ acts: "v" (on the output, the paper), "kv", "kv_penalty", "k_mean_v_penalty"
    segment: int | None = None  # tokens per reference when several are concatenated: "k_mean_v_penalty" takes V's
    # token mean per reference, as ComfyUI_IPAdapter_plus (its concat keeps one K/V row per image); None: all tokens

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, found {self.scaling!r}")
        if self.cond.ndim != 3:
            raise ValueError(f"image tokens must be (batch, tokens, dim), found shape {tuple(self.cond.shape)}")
        if self.uncond is not None and self.uncond.shape != self.cond.shape:
            raise ValueError(
                f"unconditional tokens {tuple(self.uncond.shape)} must match conditional tokens {tuple(self.cond.shape)}"
            )
        if self.window is not None:
            check_window(*self.window)
            self.window = (float(self.window[0]), float(self.window[1]))  # a list or ints compare as the tuple
        if self.mask is not None:
            if self.mask.ndim != 3 or self.mask.shape[0] not in (1, self.cond.shape[0]):
                raise ValueError(
                    f"a mask must be (1 or {self.cond.shape[0]} prompts, height, width); found {tuple(self.mask.shape)}"
                )


def check_window(start: float, end: float) -> None:
    if not 0 <= start <= end <= 1:
        raise ValueError(f"expected 0 <= start <= end <= 1, found start={start}, end={end}")


@dataclass(frozen=True)
class BatchLayout:
    """How a pipeline stacks its UNet batch: chunks of `images` rows each (prompts x images per prompt, in
    diffusers' order p0,p0,p1,p1), of the kinds `chunks[k]` names for a batch of k chunks, one letter per chunk:
    "u" unconditional, "c" conditional. E.g. {1: "c", 2: "uc"} for classifier-free guidance that a callback may
    switch off, {2: "cc", 3: "ucc"} for perturbed-attention guidance (its perturbed rows are conditional)."""

    images: int
    chunks: dict[int, str]

    def __post_init__(self) -> None:
        if self.images < 1 or any(k < 1 or len(v) != k or set(v) - {"u", "c"} for k, v in self.chunks.items()):
            raise ValueError(f"expected images >= 1 and k letters u/c for k chunks; found {self.images}, {self.chunks}")

    def kinds(self, batch_size: int) -> str:
        """The chunk kinds of a UNet batch of `batch_size` rows, or a ValueError naming the layouts expected."""
        # `//` and `%`, not divmod(): under torch.compile a batch size that changed between calls is symbolic, and
        # dynamo cannot trace divmod() on it (the layer falls back to eager and recompiles at every call)
        k, rest = batch_size // self.images, batch_size % self.images
        if rest or k not in self.chunks:
            fits = sorted(self.chunks.items())
            expected = ", ".join(f"{n * self.images} ({'+'.join(KIND[c] for c in v)})" for n, v in fits)
            raise ValueError(
                f"UNet batch of {batch_size} rows does not fit this pipeline's layout for {self.images} images: "
                f"expected {expected} rows"
            )
        return self.chunks[k]


KIND = {"u": "unconditional", "c": "conditional"}


def rows_for(rows: torch.Tensor, uncond: torch.Tensor | None, batch_size: int, cfg: bool,
             layout: BatchLayout | None = None) -> torch.Tensor:  # fmt: skip
    """Expands per-prompt rows (N, ...) to a UNet batch of `batch_size` rows (see the module's batch rule)."""
    n = rows.shape[0]
    if layout is not None:
        kinds = layout.kinds(batch_size)
        if layout.images % n:
            raise ValueError(f"{layout.images} images per chunk do not divide into the {n} image prompts set")
        r = layout.images // n
        chunk = {c: (rows if c == "c" or uncond is None else uncond) for c in set(kinds)}
        if r > 1:
            chunk = {c: x.repeat_interleave(r, dim=0) for c, x in chunk.items()}
        return chunk[kinds] if len(kinds) == 1 else torch.cat([chunk[c] for c in kinds])
    if not cfg:
        if batch_size % n:
            raise ValueError(f"UNet batch of {batch_size} rows does not divide into the {n} image prompts set")
        return rows if batch_size == n else rows.repeat_interleave(batch_size // n, dim=0)
    if batch_size % (2 * n):
        raise ValueError(
            f"UNet batch of {batch_size} rows is not a CFG batch (2 x multiple of {n}: unconditional rows, then "
            f"conditional rows) for the {n} image prompts set with unconditional tokens: set uncond=None when "
            "classifier-free guidance is off; for other layouts (e.g. InstructPix2Pix's three chunks, perturbed-"
            "attention guidance's extra rows, guidance switched off during a generation) run the pipeline through "
            "ImagePrompter or set `adapter.state.layout` (a BatchLayout)"
        )
    r = batch_size // (2 * n)
    first = rows if uncond is None else uncond
    if r == 1:
        return torch.cat([first, rows])
    return torch.cat([first.repeat_interleave(r, dim=0), rows.repeat_interleave(r, dim=0)])


def mask_grid(height: int, width: int, num_queries: int) -> tuple[int, int]:
    """The (h, w) latent grid of a layer with `num_queries` positions for an image of aspect width/height.

    Same rule as diffusers' `IPAdapterMaskProcessor.downsample`, so masks act on the same positions."""
    mask_h = max(1, int(math.sqrt(num_queries / (width / height))))  # (a very wide mask on a tiny layer: 1 row)
    mask_h = mask_h + int(num_queries % mask_h != 0)
    return mask_h, num_queries // mask_h


def layer_grid(latent: tuple[int, int], num_queries: int) -> tuple[int, int] | None:
    """The (h, w) grid of a UNet layer with `num_queries` positions, from the latent's (H, W): each down block
    halves both sides rounding up (stride-2 convolution, padding 1), the up blocks retrace the same sizes. None if
    no level of the latent has that many positions."""
    h, w = latent
    while h * w > num_queries and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    return (h, w) if h * w == num_queries else None


def downsample_mask(mask: torch.Tensor, num_queries: int, latent: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, H, W) mask -> (N, num_queries, 1) weights for a layer's query positions (bicubic, as diffusers).

    With the generation's latent size known (`latent`, recorded by `ImagePrompter` before each UNet call) the mask
    is stretched over the layer's real grid, whatever its own size; with a mask of the image's aspect ratio that is
    the grid diffusers derives from the mask, except at levels whose grid was rounded up (odd sides halved), where
    diffusers' rule gives another grid of the same area (e.g. 1x2 for a 2x1 layer) and ours the real one. Without
    it, diffusers' rule: the grid follows the mask's aspect ratio
    and a mismatch is padded with zeros, with a warning (the mask then lands on the wrong positions)."""
    grid = layer_grid(latent, num_queries) if latent is not None else None
    mask_h, mask_w = grid if grid is not None else mask_grid(mask.shape[1], mask.shape[2], num_queries)
    small = F.interpolate(mask[None].float(), size=(mask_h, mask_w), mode="bicubic").squeeze(0)  # (N, h, w)
    flat = small.reshape(small.shape[0], -1)  # (N, h*w)
    if flat.shape[1] != num_queries:  # aspect ratio of the mask differs from the image's: pad, as diffusers does
        warnings.warn(
            f"the mask's aspect ratio ({mask.shape[2]}x{mask.shape[1]}) does not fit a layer of {num_queries} positions; "
            "it is padded and will not line up with the image: give a mask of the output's aspect ratio, or generate "
            "through ImagePrompter, which fits masks to the output",
            UserWarning,
            stacklevel=2,
        )
        flat = F.pad(flat, (0, max(0, num_queries - flat.shape[1])), value=0.0)
    return flat[:, :num_queries, None]


def _inside(window: tuple[float, float], progress: tuple[int, int]) -> bool:
    """Step i of N lies in [start, end] when start <= i/N and (i+1)/N <= end (the official custom pipeline's rule)."""
    (start, end), (i, n) = window, progress
    return start <= i / n and (i + 1) / n <= end


class PromptState:
    """Run-time inputs of one adapter, shared by all of its attention processors."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.groups: list[TokenGroup] = []  # what the adapter attends to; empty: nothing set
        self.layer_scales: list[float] = [1.0] * num_layers  # λ of each adapted layer (groups without their own)
        self.window = (0.0, 1.0)  # active from/to these fractions of the denoising (official custom pipeline rule)
        self._progress: tuple[int, int] | None = None  # (step index, number of steps) of the current UNet call
        self._inside: dict[tuple[float, float], bool] | None = None  # each window: does it hold that step?
        self.step_tracked = False  # whether a caller (ImagePrompter) sets `progress` before UNet calls that need it
        self.latent_size: tuple[int, int] | None = None  # (H, W) of the UNet's input, when known (masks' grids)
        self._layout: BatchLayout | None = None  # how the pipeline stacks its UNet batch; None: the module's rule
        self.use_cache = True  # reuse image keys/values across denoising steps when no gradient is needed
        self._cache: dict[tuple, object] = {}  # image keys/values and masks, kept until the tokens change
        # What each attached layer does now (`attention.ImageBranch.acting` / `terms`), derived from the above and
        # cleared whenever any of it changes (tokens, scales, windows, the step when windows are in use).
        self.plans: dict[object, object] = {}

    # ---- tokens -------------------------------------------------------------------------------------------------
    @property
    def cond(self) -> torch.Tensor | None:
        """The first group's conditional tokens (the whole image prompt when there is one group)."""
        return self.groups[0].cond if self.groups else None

    @property
    def uncond(self) -> torch.Tensor | None:
        return self.groups[0].uncond if self.groups else None

    def set_tokens(self, cond: torch.Tensor | None, uncond: torch.Tensor | None = None) -> None:
        """One group of tokens; `uncond` marks every UNet batch as a CFG batch [uncond half, cond half]."""
        if cond is None:
            if uncond is not None:
                raise ValueError("unconditional image tokens were given without conditional ones")
            self.set_groups([])
            return
        self.set_groups([TokenGroup(cond, uncond)])

    def set_groups(self, groups: Sequence[TokenGroup]) -> None:
        """Several groups, attended separately and added; all with uncond or all without, and one batch size."""
        groups = list(groups)
        if groups:
            if len({g.uncond is None for g in groups}) > 1:
                raise ValueError("either every token group has unconditional tokens (CFG) or none has")
            if len({g.cond.shape[0] for g in groups}) > 1:
                raise ValueError(f"token groups disagree on the number of prompts: {[g.cond.shape[0] for g in groups]}")
            for g in groups:
                if g.layer_scales is not None and len(g.layer_scales) != self.num_layers:
                    raise ValueError(
                        f"expected one scale per adapted layer ({self.num_layers}), found {len(g.layer_scales)}"
                    )
        self.groups = groups
        self._cache.clear()
        self.plans.clear()

    def clear(self) -> None:
        self.set_groups([])

    @property
    def layout(self) -> BatchLayout | None:
        return self._layout

    @layout.setter
    def layout(self, value: BatchLayout | None) -> None:
        if value != self._layout:
            self._layout = value
            self._cache.clear()  # rows per batch size follow the layout
            self.plans.clear()  # and so do the keys/values each layer keeps per query shape (`ImageBranch.terms`)

    def _check_set(self) -> None:
        if not self.groups:
            raise ValueError(
                "no image prompt is set on this attached adapter: run the pipeline through ImagePrompter, or call "
                "`adapter.set_tokens(...)` first; to run the plain model, `detach()` the adapter"
            )

    @property
    def caching(self) -> bool:
        """Whether work is kept across UNet calls (`_cache`, `plans`): with the cache on, outside autograd, and not
        while torch.compile traces. A compiled UNet computes the image keys and values inside its graph at every
        step instead (a few small matmuls), so that each call enters it with the same Python state: keeping them
        would make the first call of a generation a graph of its own and put dict contents into its guards."""
        return self.use_cache and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def tokens_for(self, batch_size: int, group: int = 0) -> torch.Tensor:
        """The (batch_size, T, C) tokens of `group` matching a UNet batch of `batch_size` rows."""
        self._check_set()
        keep = self.caching
        key = ("tokens", group, batch_size)
        found = self._cache.get(key) if keep else None
        if found is None:
            g = self.groups[group]
            found = rows_for(g.cond, g.uncond, batch_size, cfg=g.uncond is not None, layout=self._layout)
            if keep:
                self._cache[key] = found  # every layer attends to the same rows
        return found  # type: ignore[return-value]

    def mask_for(self, group: int, batch_size: int, num_queries: int) -> torch.Tensor | None:
        """(batch_size, num_queries, 1) weights of `group`'s mask at a layer with `num_queries` positions."""
        g = self.groups[group]
        if g.mask is None:
            return None
        key = ("mask", group, batch_size, num_queries, self.latent_size)
        keep = self.caching
        found = self._cache.get(key) if keep else None
        if found is None:
            small = downsample_mask(g.mask, num_queries, self.latent_size)  # (N or 1, Q, 1)
            if small.shape[0] == 1 and g.cond.shape[0] > 1:
                small = small.expand(g.cond.shape[0], -1, -1)
            found = rows_for(small, None, batch_size, cfg=g.uncond is not None, layout=self._layout)
            if keep:
                self._cache[key] = found
        return found  # type: ignore[return-value]

    # ---- scales -------------------------------------------------------------------------------------------------
    def set_scale(self, scale: float | Sequence[float]) -> None:
        """One λ for every layer, or one per adapted layer (in attn_processors order)."""
        if isinstance(scale, (int, float)):
            self.layer_scales = [float(scale)] * self.num_layers
        else:
            scales = [float(s) for s in scale]
            if len(scales) != self.num_layers:
                raise ValueError(f"expected one scale per adapted layer ({self.num_layers}), found {len(scales)}")
            self.layer_scales = scales
        self.plans.clear()

    def scale_of(self, group: int, layer: int) -> float:
        """λ of `group` at adapted layer `layer` now: 0 outside the group's step window."""
        g = self.groups[group]
        scales = self.layer_scales if g.layer_scales is None else g.layer_scales
        if scales[layer] == 0 or not self.in_window(g.window):
            return 0.0
        return float(scales[layer])

    # ---- step window ------------------------------------------------------------------------------------------
    def set_window(self, start: float = 0.0, end: float = 1.0) -> None:
        """The adapter acts only on steps i (of N) with start <= i/N and (i+1)/N <= end."""
        check_window(start, end)
        self.window = (float(start), float(end))
        self.plans.clear()

    @property
    def progress(self) -> tuple[int, int] | None:
        return self._progress

    @progress.setter
    def progress(self, value: tuple[int, int] | None) -> None:
        if value != self._progress:
            self._progress = value
            # whether the step lies inside each window set now, decided here, outside the UNet: a compiled UNet
            # then sees one flag per window (two graphs: inside, outside) rather than the step number (one per step)
            windows = {self.window, *(g.window for g in self.groups if g.window is not None)}
            self._inside = None if value is None else {w: _inside(w, value) for w in windows}
            if self.windowed:
                self.plans.clear()  # which groups act may change with the step

    @property
    def windowed(self) -> bool:
        """Whether a step window is set (on the adapter or a group): only then does the step matter."""
        return self.window != (0.0, 1.0) or any(g.window not in (None, (0.0, 1.0)) for g in self.groups)

    def in_window(self, window: tuple[float, float] | None = None) -> bool:
        window = self.window if window is None else window
        if window == (0.0, 1.0):
            return True
        if self._inside is None:
            if not self.step_tracked:
                raise ValueError(
                    f"a step window {window} is set but the denoising step is unknown: run the pipeline through "
                    "ImagePrompter (it tracks the step), or set `adapter.state.progress = (i, num_steps)` before "
                    "each UNet call"
                )
            return True  # a step the tracker did not find in the scheduler's timesteps
        inside = self._inside.get(window)
        return _inside(window, self._progress) if inside is None else inside  # (a window set during the steps)

    # ---- key/value cache ----------------------------------------------------------------------------------------
    def cached(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self._cache.get(key) if self.caching else None  # type: ignore[return-value]

    def store(self, key: tuple, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.caching:
            self._cache[key] = kv
