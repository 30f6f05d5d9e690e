"""Each generation control's effect, measured on the shipped tiny world with the attribute reader (not just shapes):
presets split appearance from geometry, averaged references carry attributes of both, a negative image pushes its
attributes out, a mask confines the reference's shape. Seeds are fixed, so every run measures the same images."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ipadapter.blocks import preset_weights
from ipadapter.tinyworld.evaluate import held_out_scenes, load_tinyworld
from ipadapter.tinyworld.world import ATTRIBUTES, render

N, STEPS = 32, 6  # 6 DDIM steps: the effects measured here are as clear as at 10 (the checked margins moved by
# at most 0.06), in 60% of the time; the negative image's subtler effect is measured at 10
APPEARANCE, LAYOUT = ("color", "pattern", "background"), ("position",)


@pytest.fixture(scope="module")
def world():
    return load_tinyworld("tinyworld-base")


def _reads(world, references, seed=0, steps=STEPS, **controls):
    pipe, prompter, reader = world
    images = prompter(image=references, prompt=[""] * len(references), num_inference_steps=steps, guidance_scale=4.0,
                      generator=torch.Generator("cpu").manual_seed(seed), **controls).images  # fmt: skip
    return reader.predict(images)


def _kept(scenes, reads, names):
    return sum(getattr(s, n) == getattr(r, n) for s, r in zip(scenes, reads) for n in names) / (len(scenes) * len(names))


def test_style_preset_carries_appearance_not_position_and_composition_the_reverse(world):
    scenes = held_out_scenes(N, 4242)
    references = [render(s) for s in scenes]
    style = _reads(world, references, preset="style")
    composition = _reads(world, references, preset="composition")
    off = _reads(world, references, scale=0.0)
    style_appearance, composition_appearance = _kept(scenes, style, APPEARANCE), _kept(scenes, composition, APPEARANCE)
    style_layout, composition_layout = _kept(scenes, style, LAYOUT), _kept(scenes, composition, LAYOUT)
    assert style_appearance >= composition_appearance + 0.3, (style_appearance, composition_appearance)
    assert composition_layout >= style_layout + 0.3, (composition_layout, style_layout)
    assert style_layout <= _kept(scenes, off, LAYOUT) + 0.15  # style does not carry position
    assert composition_appearance <= _kept(scenes, off, APPEARANCE) + 0.15  # composition does not carry colour
    names = world[1].adapter.layer_names  # the presets really are block subsets of the same adapter
    assert sum(w > 0 for w in preset_weights(names, "style")) + sum(w > 0 for w in preset_weights(names, "composition")) <= len(names)


def test_two_averaged_references_carry_attributes_of_both(world):
    scenes = held_out_scenes(N, 99)
    a = [replace(s, background="black", size="large") for s in scenes]
    b = [replace(s, background="pink", size="small") for s in scenes]
    c = [replace(s, background="white", size="medium") for s in scenes]
    averaged = _reads(world, [[render(x), render(y)] for x, y in zip(a, b)], combine="average")
    unrelated = _reads(world, [render(z) for z in c])
    for source in (a, b):  # each reference shows through the average, far above an unrelated reference's images
        assert _kept(source, averaged, ("background", "size")) >= _kept(source, unrelated, ("background", "size")) + 0.15


def test_negative_image_pushes_its_attributes_out(world):
    scenes = held_out_scenes(N, 7)
    references = [render(s) for s in scenes]
    plain = _reads(world, references, steps=10)
    pushed = _reads(world, references, steps=10, negative_image=references)  # the same image on the unconditional side
    assert _kept(scenes, pushed, list(ATTRIBUTES)) <= _kept(scenes, plain, list(ATTRIBUTES)) - 0.1


def test_mask_puts_the_references_shape_inside_the_mask_and_not_outside(world):
    """A reference's shape sits on one side (left / top); the mask covers the other half. The generated shape moves
    into the mask and keeps the reference's colour, and appears on the reference's own side (outside the mask) no
    more often than with no adapter. A mask over the reference's own side keeps its position."""
    size = 24
    inside = outside = off_inside = off_outside = 0
    colour, off_colour, own_side = [], [], []
    for side, other, away in (("left", "right", _half("right")), ("top", "bottom", _half("bottom"))):
        scenes = [replace(s, position=side, size="medium") for s in held_out_scenes(size, 31)]
        references = [render(s) for s in scenes]
        masked = _reads(world, references, mask=away)
        off = _reads(world, references, scale=0.0)
        covered = _reads(world, references, mask=1 - away)
        inside += sum(r.position == other for r in masked)
        outside += sum(r.position == side for r in masked)
        off_inside += sum(r.position == other for r in off)
        off_outside += sum(r.position == side for r in off)
        colour.append(_kept(scenes, masked, ("color",)))
        off_colour.append(_kept(scenes, off, ("color",)))
        own_side.append(_kept(scenes, covered, ("position",)))
    n = 2 * size
    assert inside / n >= off_inside / n + 0.2, (inside, off_inside)  # the shape moves into the mask
    assert outside / n <= off_outside / n + 0.05, (outside, off_outside)  # and not onto the reference's own side
    assert min(colour) >= max(off_colour) + 0.3, (colour, off_colour)  # it is the reference's shape
    assert min(own_side) >= 0.9, own_side


def _half(name: str) -> torch.Tensor:
    """A 64x64 mask, white on one half: left, right, top or bottom."""
    mask = torch.zeros(64, 64)
    rows, cols = {"left": (slice(None), slice(0, 32)), "right": (slice(None), slice(32, None)),
                  "top": (slice(0, 32), slice(None)), "bottom": (slice(32, None), slice(None))}[name]  # fmt: skip
    mask[rows, cols] = 1
    return mask


def test_image_mask_decides_what_of_the_reference_the_encoder_sees(world):
    """The reference's shape on the left: showing the encoder only the left part keeps the shape's attributes,
    hiding it loses them as if nothing were shown; an all-white mask is no mask."""
    import numpy as np

    scenes = [replace(s, position="left", size="large") for s in held_out_scenes(N, 7)]
    references = [render(s) for s in scenes]
    left = np.zeros((64, 64), np.float32)
    left[:, :40] = 1  # the shape's side (a large shape on the left ends before column 40)
    subject = ("shape", "color", "pattern")
    unmasked = _kept(scenes, _reads(world, references), subject)
    shown = _kept(scenes, _reads(world, references, image_mask=left), subject)
    hidden = _kept(scenes, _reads(world, references, image_mask=1 - left), subject)
    nothing = _kept(scenes, _reads(world, references, image_mask=np.zeros((64, 64), np.float32)), subject)
    assert shown >= unmasked - 0.1 and hidden <= nothing + 0.1 and hidden <= unmasked - 0.3, (unmasked, shown, hidden)
    prompter = world[1]
    assert torch.equal(prompter.features(references[:2], masks=np.ones((64, 64), np.float32)),
                       prompter.features(references[:2]))  # fmt: skip
