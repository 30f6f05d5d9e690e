"""The tiny world: procedural 64x64 scenes of one coloured shape, their captions and a dataset maker.

A scene is one value per attribute in `ATTRIBUTES`. `render` draws it with PIL at 4x resolution and
box-downsamples (anti-aliasing); `caption` states any subset of its attributes in a fixed word order, e.g.
"a large red striped circle on the left on a pink background"; `parse_caption` inverts `caption`.

Geometry, in output pixels at size 64 (everything scales with `size`):
    - size: the shape's nominal diameter is 14 (small), 23 (medium) or 33 (large) px.
    - position: the shape's centre is at the canvas centre, or moved left/right/up/down as far as the shape
      allows while keeping a margin of 2.5 px plus the jitter, so a shape never leaves the canvas.
    - pattern: stripes (horizontal, 6 px period, 3 px bands) or dots (6 px staggered grid, 3 px dots), in a
      light tint of a dark shape colour or a dark tint of a light one, anchored at the shape's centre and drawn
      inside the shape only, so a small shape still shows at least one band or dot at its centre.
    - jitter (only when `render` gets a `seed`): +-1.5 px shift and, for non-circles, +-12 degrees rotation.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, fields

from PIL import Image, ImageChops, ImageDraw

# Ordered: this is the order of `Scene` fields and of `WorldSample.attributes`. Every value is one lower-case
# word, and no value appears under two attributes, so a caption word names its attribute unambiguously.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "color": ("red", "green", "blue", "yellow", "purple", "orange"),
    "pattern": ("solid", "striped", "dotted"),
    "background": ("white", "gray", "black", "pink"),
    "size": ("small", "medium", "large"),
    "position": ("left", "right", "top", "bottom", "center"),
}

# Shape colours (RGB). Chosen to differ in hue from each other and from every background colour.
SHAPE_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 85, 215),
    "yellow": (240, 210, 40),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
}

# Background colours (RGB): neutral or pale, so every shape colour stands out on each.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "pink": (255, 190, 205),
}

# Nominal shape diameter in pixels at size 64.
SIZE_PX: dict[str, float] = {"small": 14.0, "medium": 23.0, "large": 33.0}

# Words a caption adds around attribute values, one phrase per position value.
POSITION_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_GENERIC_NOUN = "shape"  # stands in for the shape word when a caption does not state the shape
_FILLER_WORDS = ("a", "on", "the", "at", "in", "background", _GENERIC_NOUN)

_SUPERSAMPLE = 4  # draw at 4x the output size, then box-downsample
_EXTENT = 1.1  # farthest point of any shape from its centre, in units of the nominal radius (triangle, star)
_MARGIN_PX = 2.5  # minimum gap between a shape and the canvas edge, at size 64, on top of the jitter
_MAX_SHIFT_PX = 1.5  # jitter: maximum shift per axis, at size 64
_MAX_ROTATION_DEG = 12.0  # jitter: maximum rotation of non-circles
_STRIPE_PERIOD_PX = 6.0  # at size 64; bands are half the period
_DOT_SPACING_PX = 6.0  # at size 64
_DOT_RADIUS_PX = 1.5  # at size 64


@dataclass(frozen=True)
class Scene:
    """One tiny-world scene: a single patterned shape on a plain background."""

    shape: str  # one of ATTRIBUTES["shape"]
    color: str  # colour of the shape, one of ATTRIBUTES["color"]
    pattern: str  # fill pattern inside the shape, one of ATTRIBUTES["pattern"]
    background: str  # canvas colour, one of ATTRIBUTES["background"]
    size: str  # one of ATTRIBUTES["size"]
    position: str  # where the shape sits on the canvas, one of ATTRIBUTES["position"]

    def __post_init__(self) -> None:
        for name, allowed in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Scene.{name} must be one of {allowed}; found {value!r}")

    def as_dict(self) -> dict[str, str]:
        """Returns attribute -> value, in `ATTRIBUTES` order."""
        return {name: getattr(self, name) for name in ATTRIBUTES}


# The dataclass fields and ATTRIBUTES must name the same attributes in the same order.
if tuple(f.name for f in fields(Scene)) != tuple(ATTRIBUTES):
    raise RuntimeError("Scene fields and ATTRIBUTES keys disagree")


@dataclass
class WorldSample:
    """A rendered scene with its caption."""

    image: Image.Image  # RGB render of `scene`
    scene: Scene  # the ground truth
    caption: str  # states exactly `attributes` of `scene` ("" when none)
    attributes: tuple[str, ...]  # attributes the caption mentions, in ATTRIBUTES order


def sample_scene(rng: random.Random) -> Scene:
    """Draws every attribute uniformly and independently.

    Args:
        rng: a standard-library `random.Random`; the scene depends only on its state.

    Returns:
        The sampled scene.
    """
    return Scene(**{name: rng.choice(values) for name, values in ATTRIBUTES.items()})


def _shape_centre(scene: Scene, size: int, shift: tuple[float, float]) -> tuple[float, float]:
    """Centre of the shape in output pixels, before supersampling."""
    scale = size / 64.0
    radius = SIZE_PX[scene.size] / 2 * scale
    offset = size / 2 - _EXTENT * radius - (_MARGIN_PX + _MAX_SHIFT_PX) * scale  # as far as it can go
    dx, dy = {
        "left": (-offset, 0.0),
        "right": (offset, 0.0),
        "top": (0.0, -offset),
        "bottom": (0.0, offset),
        "center": (0.0, 0.0),
    }[scene.position]
    return size / 2 + dx + shift[0] * scale, size / 2 + dy + shift[1] * scale


def _outline(shape: str, cx: float, cy: float, r: float, angle_deg: float) -> list[tuple[float, float]]:
    """Polygon of a non-circle shape with nominal radius `r` centred at (cx, cy), rotated by `angle_deg`."""
    if shape == "square":
        h = 0.82 * r  # half side: gives the square about the circle's area
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        big = _EXTENT * r  # circumradius; the centroid is lowered by big/4 so the bounding box is centred
        points = [(big * math.sin(a), big / 4 - big * math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    elif shape == "star":
        outer, inner = _EXTENT * r, 0.45 * _EXTENT * r
        points = []
        for k in range(10):
            rad = outer if k % 2 == 0 else inner
            a = k * math.pi / 5
            points.append((rad * math.sin(a), 0.1 * outer - rad * math.cos(a)))
    elif shape == "cross":
        arm, half = 0.95 * r, 0.34 * r  # arm length from the centre, half of the bar width
        points = [
            (-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half), (half, half),
            (half, arm), (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half),
        ]  # fmt: skip
    else:
        raise ValueError(f"no outline for shape {shape!r}; expected one of {ATTRIBUTES['shape'][1:]}")
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _pattern_rgb(color: str) -> tuple[int, int, int]:
    """Tint used for stripes and dots: lighter for dark colours, darker for light ones."""
    r, g, b = SHAPE_RGB[color]
    if 0.299 * r + 0.587 * g + 0.114 * b > 140:
        return (int(r * 0.35), int(g * 0.35), int(b * 0.35))
    return tuple(int(v + (255 - v) * 0.7) for v in (r, g, b))  # type: ignore[return-value]


def _pattern_mask(pattern: str, big: int, cx: float, cy: float, scale: float) -> Image.Image:
    """Full-canvas L mask (255 = pattern) anchored so a band or dot passes through (cx, cy)."""
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if pattern == "striped":
        period = _STRIPE_PERIOD_PX * scale
        k0 = math.floor(-cy / period) - 1
        for k in range(k0, k0 + int(big / period) + 3):
            top = cy + k * period - period / 4
            draw.rectangle([0, top, big, top + period / 2 - 1], fill=255)
    elif pattern == "dotted":
        step, rad = _DOT_SPACING_PX * scale, _DOT_RADIUS_PX * scale
        n = int(big / step) + 2
        for j in range(-n, n + 1):
            y = cy + j * step
            x_shift = step / 2 if j % 2 else 0.0  # staggered rows, so the dots do not read as stripes
            for i in range(-n, n + 1):
                x = cx + i * step + x_shift
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=255)
    return mask


def render(scene: Scene, size: int = 64, seed: int | None = None) -> Image.Image:
    """Draws a scene.

    The image is drawn at 4x and box-downsampled, so edges are anti-aliased. The same arguments always give
    the same pixels.

    Args:
        scene: what to draw.
        size: output width and height in pixels; geometry scales with it (the reference is 64).
        seed: None draws the canonical layout; an int adds deterministic jitter from `random.Random(seed)`:
            +-1.5 px shift per axis and +-12 degrees rotation for non-circles. Attributes stay unambiguous.

    Returns:
        An RGB image of `size` x `size`.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels so patterns stay visible; found {size}")
    shift, angle = (0.0, 0.0), 0.0
    if seed is not None:
        jitter = random.Random(seed)
        shift = (jitter.uniform(-_MAX_SHIFT_PX, _MAX_SHIFT_PX), jitter.uniform(-_MAX_SHIFT_PX, _MAX_SHIFT_PX))
        angle = jitter.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG)
    big = size * _SUPERSAMPLE
    scale = big / 64.0  # supersampled pixels per reference pixel
    cx, cy = (v * _SUPERSAMPLE for v in _shape_centre(scene, size, shift))
    r = SIZE_PX[scene.size] / 2 * scale

    shape_mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(shape_mask)
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_outline(scene.shape, cx, cy, r, angle), fill=255)

    canvas = Image.new("RGB", (big, big), BACKGROUND_RGB[scene.background])
    canvas.paste(SHAPE_RGB[scene.color], (0, 0, big, big), shape_mask)
    if scene.pattern != "solid":
        inside = ImageChops.multiply(shape_mask, _pattern_mask(scene.pattern, big, cx, cy, scale))
        canvas.paste(_pattern_rgb(scene.color), (0, 0, big, big), inside)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _check_attribute_names(attributes: Iterable[str]) -> set[str]:
    names = set(attributes)
    unknown = sorted(names - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; expected names from {tuple(ATTRIBUTES)}")
    return names


def caption(scene: Scene, attributes: Iterable[str]) -> str:
    """States the given attributes of a scene in words, in a fixed order.

    Order: size, color, pattern, shape (or "shape" when not stated), position phrase, background phrase, e.g.
    "a large red striped circle on the left on a pink background" or "a shape at the top".

    Args:
        scene: the scene to describe.
        attributes: names of the attributes to state (any order, each from `ATTRIBUTES`).

    Returns:
        The caption, or "" when `attributes` is empty.
    """
    names = _check_attribute_names(attributes)
    if not names:
        return ""
    words = ["a"]
    words += [getattr(scene, name) for name in ("size", "color", "pattern") if name in names]
    words.append(scene.shape if "shape" in names else _GENERIC_NOUN)
    if "position" in names:
        words.append(POSITION_PHRASE[scene.position])
    if "background" in names:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


_WORD_TO_ATTRIBUTE = {value: name for name, values in ATTRIBUTES.items() for value in values}


def parse_caption(text: str) -> dict[str, str]:
    """Reads back the attributes a caption states; the inverse of `caption`.

    Matching is by word: each attribute value is a unique word, so word order and filler words do not matter,
    and unknown words are ignored (so "A red circle." also parses).

    Args:
        text: a caption.

    Returns:
        attribute -> value for every attribute the text states, in `ATTRIBUTES` order.

    Raises:
        ValueError: if the text states two different values for one attribute.
    """
    found: dict[str, str] = {}
    for word in "".join(ch if ch.isalpha() else " " for ch in text.lower()).split():
        name = _WORD_TO_ATTRIBUTE.get(word)
        if name is None:
            continue
        if found.get(name, word) != word:
            raise ValueError(f"caption states two values for {name!r}: {found[name]!r} and {word!r} in {text!r}")
        found[name] = word
    return {name: found[name] for name in ATTRIBUTES if name in found}


def vocabulary() -> list[str]:
    """Returns every word any caption can contain, sorted."""
    words = set(_FILLER_WORDS) | set(_WORD_TO_ATTRIBUTE)
    for phrase in POSITION_PHRASE.values():
        words.update(phrase.split())
    return sorted(words)


CAPTION_MODES = ("random", "full", "none")


def make_dataset(n: int, seed: int, size: int = 64, caption_mode: str = "random") -> list[WorldSample]:
    """Renders `n` random scenes with captions; the same arguments always give the same samples.

    Args:
        n: number of samples.
        seed: seeds one `random.Random` that draws scenes, render jitter and caption attributes.
        size: image width and height in pixels.
        caption_mode: "random" mentions each attribute independently with probability 0.5 (so some captions
            are empty); "full" mentions all attributes; "none" gives empty captions.

    Returns:
        The samples, each rendered with its own jitter.
    """
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}; found {caption_mode!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0; found {n}")
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        scene = sample_scene(rng)
        jitter_seed = rng.getrandbits(32)
        if caption_mode == "random":
            attributes = tuple(name for name in ATTRIBUTES if rng.random() < 0.5)
        elif caption_mode == "full":
            attributes = tuple(ATTRIBUTES)
        else:
            attributes = ()
        image = render(scene, size, seed=jitter_seed)
        samples.append(WorldSample(image, scene, caption(scene, attributes), attributes))
    return samples
