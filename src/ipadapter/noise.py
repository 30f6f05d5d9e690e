"""Noised references as the unconditional image prompt.

IP-Adapter was trained with the image dropped (zero embedding), so under classifier-free guidance the
unconditional image prompt works like a negative prompt: generation moves from it towards the reference. A noised
copy of the reference as the unconditional image keeps what the noise destroys (fine detail, exact colours) out of
what guidance amplifies, which tempers the reference's pull (ComfyUI_IPAdapter_plus's `IPAdapterNoise` idea).
Deterministic: the noise is seeded from the image's pixels unless a seed is given.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

NOISE_KINDS = ("fade", "dissolve", "gaussian")


def noised_reference(image: Image.Image, strength: float, kind: str = "fade", blur: float = 0.0,
                     seed: int | None = None) -> Image.Image:  # fmt: skip
    """A copy of `image` with noise of `strength` in [0, 1].

    kind: "fade" blends towards uniform noise (pixel*(1-s) + U*s); "dissolve" replaces a fraction s of pixels by
    uniform noise; "gaussian" adds N(0, s) noise. `blur` (pixels) then blurs the result.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"noise strength must be in [0, 1], found {strength}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    if seed is None:
        seed = int(pixels.sum() * 1000) % 1_000_000_007
    rng = np.random.default_rng(seed)
    if kind == "fade":
        out = pixels * (1 - strength) + rng.random(pixels.shape, dtype=np.float32) * strength
    elif kind == "dissolve":
        replace = rng.random(pixels.shape[:2], dtype=np.float32)[..., None] < strength
        out = np.where(replace, rng.random(pixels.shape, dtype=np.float32), pixels)
    else:
        out = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * strength
    result = Image.fromarray((np.clip(out, 0, 1) * 255).round().astype(np.uint8))
    if blur > 0:
        result = result.filter(ImageFilter.GaussianBlur(blur))
    return result
