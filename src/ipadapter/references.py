"""Preparing reference images for the square input of a CLIP image encoder.

CLIP's own processor resizes the short side and centre-crops, which cuts off the sides of wide references. The
official README suggests squashing to the square instead; padding keeps everything at a smaller scale; tiles encode
a large or wide reference as several square crops whose tokens are used together (concat) or averaged.
"""

from __future__ import annotations

import math

from PIL import Image, ImageOps

PREP_MODES = ("center_crop", "pad", "squash", "tiles")


def prepare(image: Image.Image, mode: str = "center_crop", size: int = 224, pad_color: tuple[int, int, int] = (0, 0, 0),
            tile_grid: int | None = None) -> list[Image.Image]:  # fmt: skip
    """The square image(s) of side `size` that stand for `image`: one, or several for "tiles".

    center_crop: the central square, then resized (CLIPImageProcessor's result for the same size).
    pad: the whole image centred on a square of `pad_color`.
    squash: the whole image resized to the square, aspect ratio not kept.
    tiles: square crops covering the image: along the long side as many as its aspect ratio needs (the ratio
      rounded up, overlapping evenly: ComfyUI_IPAdapter_plus's IPAdapterTiled count), or a `tile_grid` x
      `tile_grid` grid of crops of the central square when given; a near-square image (long side < 4/3 of the
      short one, ComfyUI's 0.75 < h/w < 1.33) gets the 2 x 2 grid, since crops along its long side would be
      (nearly) the whole image repeated.
    """
    if mode not in PREP_MODES:
        raise ValueError(f"unknown reference preparation {mode!r}; expected one of {', '.join(PREP_MODES)}")
    image = image.convert("RGB")
    w, h = image.size
    resample = Image.Resampling.BICUBIC
    if mode == "squash":
        return [image.resize((size, size), resample)]
    if mode == "pad":
        return [ImageOps.pad(image, (size, size), method=resample, color=pad_color)]
    if mode == "center_crop":
        return [ImageOps.fit(image, (size, size), method=resample)]
    tile_grid = _grid(w, h, tile_grid)
    if tile_grid is not None:
        side = min(w, h)
        square = ImageOps.fit(image, (side, side), method=resample)
        step = side / tile_grid
        return [square.crop((round(i * step), round(j * step), round((i + 1) * step), round((j + 1) * step)))
                .resize((size, size), resample) for j in range(tile_grid) for i in range(tile_grid)]  # fmt: skip
    side = min(w, h)
    count = tile_count((w, h))
    long = max(w, h)
    starts = [round(k * (long - side) / (count - 1)) for k in range(count)]  # evenly spaced, overlapping if needed
    boxes = [(s, 0, s + side, side) if w >= h else (0, s, side, s + side) for s in starts]
    return [image.crop(box).resize((size, size), resample) for box in boxes]


def _grid(w: int, h: int, tile_grid: int | None) -> int | None:
    """The N of an N x N grid of crops of the central square, or None for crops along the long side."""
    if tile_grid is None and max(w, h) < 4 / 3 * min(w, h):
        return 2  # near-square (ComfyUI's 0.75 < h/w < 1.33)
    if tile_grid is not None and (isinstance(tile_grid, bool) or int(tile_grid) != tile_grid or tile_grid < 1):
        raise ValueError(f"tile_grid must be a whole number >= 1 (an N x N grid), found {tile_grid!r}")
    if tile_grid is not None:
        tile_grid = int(tile_grid)
    return tile_grid


def tile_count(size: tuple[int, int], tile_grid: int | None = None) -> int:
    """How many squares `prepare(image, "tiles", tile_grid=tile_grid)` cuts from an image of `size` (width, height)."""
    w, h = size
    grid = _grid(w, h, tile_grid)
    if grid is not None:
        return grid * grid
    return max(2, math.ceil(max(w, h) / min(w, h) - 1e-9))  # round() left a gap at ratios such as 2.4 (2 tiles)
