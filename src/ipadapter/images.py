"""Reading reference images with errors that say what went wrong."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError


def _open(path: str | os.PathLike) -> Image.Image:
    """The decoded image at `path`, in its own mode; FileNotFoundError / ValueError name the path and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image (expected PNG, JPEG, WebP, ...): {e}") from e


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file as RGB; FileNotFoundError / ValueError name the path and the problem."""
    return _open(path).convert("RGB")


def load_alpha(path: str | os.PathLike) -> Image.Image:
    """The alpha channel of an image file as an "L" mask (opaque = white); ValueError when it has none."""
    image = _open(path)
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        raise ValueError(f"{path} has no alpha channel (mode {image.mode}); expected a PNG / WebP with transparency "
                         "for --image-mask alpha")  # fmt: skip
    return image.convert("RGBA").getchannel("A")
