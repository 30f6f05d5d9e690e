"""Reading reference images with errors that say what went wrong."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


def _open(path: str | os.PathLike) -> Image.Image:
    """The decoded image at `path`, in its own mode; FileNotFoundError / ValueError name the path and the problem."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return upright(image)
    except Image.DecompressionBombError as e:  # a few KB that would decode to gigabytes
        raise ValueError(f"{path} is too large to decode safely ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {path} as an image (expected PNG, JPEG, WebP, ...): {e}") from e


def upright(image: Image.Image) -> Image.Image:
    """A copy of `image` turned as its EXIF orientation says it is shown (a phone's portrait photo is stored
    sideways), as diffusers' `load_image` does; unchanged without one."""
    return ImageOps.exif_transpose(image) or image.copy()


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale images as 8-bit "L" over their full range (PIL's own conversion clips them: a
    16-bit ramp becomes almost all white, a float image in [0, 1] almost all black); other modes unchanged."""
    import numpy as np

    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    else:  # 16-bit PNG / TIFF samples (PIL may open them as "I"); 8-bit values in an "I" image stay as they are
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(np.rint(values / top * 255), 0, 255).astype(np.uint8), "L")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file as RGB (16-bit and float images scaled to 8 bits); FileNotFoundError / ValueError name
    the path and the problem."""
    return to_8bit(_open(path)).convert("RGB")


def load_alpha(path: str | os.PathLike) -> Image.Image:
    """The alpha channel of an image file as an "L" mask (opaque = white); ValueError when it has none."""
    image = _open(path)
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        raise ValueError(f"{path} has no alpha channel (mode {image.mode}); expected a PNG / WebP with transparency "
                         "for --image-mask alpha")  # fmt: skip
    return image.convert("RGBA").getchannel("A")
