"""Reading reference images with errors that say what went wrong."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file as RGB; FileNotFoundError / ValueError name the path and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image (expected PNG, JPEG, WebP, ...): {e}") from e


def load_alpha(path: str | os.PathLike) -> Image.Image:
    """The alpha channel of an image file as an "L" mask (opaque = white); ValueError when it has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            if not has_alpha:
                raise ValueError(f"{path} has no alpha channel (mode {image.mode}); expected a PNG / WebP with "
                                 "transparency for --image-mask alpha")  # fmt: skip
            return image.convert("RGBA").getchannel("A")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image (expected PNG, JPEG, WebP, ...): {e}") from e
