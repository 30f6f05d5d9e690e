"""Tiny world: scenes, rendering, captions and datasets."""

import dataclasses
import random

import numpy as np
import pytest

from ipadapter.tinyworld.world import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    Scene,
    caption,
    make_dataset,
    parse_caption,
    render,
    sample_scene,
    vocabulary,
)

BASE = Scene(shape="square", color="red", pattern="solid", background="white", size="medium", position="center")


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_attribute_values_are_distinct_single_lowercase_words():
    values = [v for vs in ATTRIBUTES.values() for v in vs]
    assert len(values) == len(set(values))
    assert all(v.isalpha() and v.islower() for v in values)
    assert tuple(BASE.as_dict()) == tuple(ATTRIBUTES)


def test_scene_rejects_unknown_value():
    with pytest.raises(ValueError, match=r"Scene.color must be one of .* found 'teal'"):
        dataclasses.replace(BASE, color="teal")


def test_make_dataset_is_deterministic_from_seed():
    a, b, c = make_dataset(12, seed=3), make_dataset(12, seed=3), make_dataset(12, seed=4)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(pixels(x.image), pixels(y.image)) for x, y in zip(a, b))
    assert [s.scene for s in a] != [s.scene for s in c]
    assert np.array_equal(pixels(render(BASE, seed=5)), pixels(render(BASE, seed=5)))


def test_every_value_renders_and_changing_one_attribute_changes_the_image():
    base = pixels(render(BASE))
    for name, values in ATTRIBUTES.items():
        for value in values:
            image = render(dataclasses.replace(BASE, **{name: value}))
            assert image.mode == "RGB" and image.size == (64, 64)
            changed = int((np.abs(pixels(image) - base).max(-1) > 30).sum())
            if value == getattr(BASE, name):
                assert changed == 0
            else:
                assert changed >= 20, f"{name}={value} changes only {changed} pixels"


@pytest.mark.parametrize("shape", ATTRIBUTES["shape"])
def test_patterns_stay_visible_inside_small_shapes(shape):
    scene = Scene(shape=shape, color="blue", pattern="solid", background="white", size="small", position="center")
    solid = pixels(render(scene))
    for pattern in ("striped", "dotted"):
        patterned = pixels(render(dataclasses.replace(scene, pattern=pattern)))
        assert int((np.abs(patterned - solid).max(-1) > 60).sum()) >= 6, (shape, pattern)
    striped = pixels(render(dataclasses.replace(scene, pattern="striped")))
    dotted = pixels(render(dataclasses.replace(scene, pattern="dotted")))
    assert int((np.abs(striped - dotted).max(-1) > 60).sum()) >= 6


def test_sizes_are_clearly_separated():
    widths = {}
    for size in ATTRIBUTES["size"]:
        image = pixels(render(dataclasses.replace(BASE, shape="circle", size=size)))
        columns = np.nonzero((np.abs(image - 255).max(-1) > 128).any(0))[0]
        widths[size] = columns.max() - columns.min() + 1
    assert widths["small"] + 6 <= widths["medium"] and widths["medium"] + 6 <= widths["large"]


def test_shapes_never_leave_the_canvas():
    for shape in ATTRIBUTES["shape"]:
        for position in ("left", "right", "top", "bottom"):
            scene = Scene(shape=shape, color="blue", pattern="solid", background="white", size="large",
                          position=position)  # fmt: skip
            for seed in range(4):
                image = pixels(render(scene, seed=seed))
                border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
                assert (border == BACKGROUND_RGB["white"]).all(), (shape, position, seed)


def test_caption_states_attributes_in_fixed_order():
    scene = Scene(shape="circle", color="red", pattern="striped", background="pink", size="large", position="left")
    assert caption(scene, ATTRIBUTES) == "a large red striped circle on the left on a pink background"
    assert caption(scene, ["position", "color"]) == "a red shape on the left"
    assert caption(scene, []) == ""
    with pytest.raises(ValueError, match=r"unknown attributes \['hue'\]"):
        caption(scene, ["hue"])


def test_caption_parse_round_trip_for_random_subsets():
    rng = random.Random(0)
    for _ in range(300):
        scene = sample_scene(rng)
        subset = [name for name in ATTRIBUTES if rng.random() < 0.5]
        assert parse_caption(caption(scene, subset)) == {name: getattr(scene, name) for name in subset}


def test_parse_caption_ignores_case_and_punctuation_and_rejects_contradictions():
    assert parse_caption("A Blue star, at the TOP.") == {"shape": "star", "color": "blue", "position": "top"}
    with pytest.raises(ValueError, match="two values for 'color': 'red' and 'blue'"):
        parse_caption("a red blue circle")


def test_vocabulary_covers_every_caption_word():
    words = vocabulary()
    assert words == sorted(set(words))
    rng = random.Random(1)
    seen = set()
    for _ in range(300):
        subset = [name for name in ATTRIBUTES if rng.random() < 0.5]
        seen.update(caption(sample_scene(rng), subset).split())
    assert seen <= set(words)
    assert {v for vs in ATTRIBUTES.values() for v in vs} <= set(words)


def test_make_dataset_caption_modes():
    full = make_dataset(8, seed=0, caption_mode="full")
    assert all(s.attributes == tuple(ATTRIBUTES) and parse_caption(s.caption) == s.scene.as_dict() for s in full)
    assert all(s.caption == "" and s.attributes == () for s in make_dataset(8, seed=0, caption_mode="none"))
    rand = make_dataset(200, seed=0, caption_mode="random")
    assert all(tuple(parse_caption(s.caption)) == s.attributes for s in rand)
    mentioned = sum(len(s.attributes) for s in rand) / (200 * len(ATTRIBUTES))
    assert 0.4 < mentioned < 0.6
    assert any(s.caption == "" for s in rand)
    with pytest.raises(ValueError, match="caption_mode must be one of .* found 'some'"):
        make_dataset(1, seed=0, caption_mode="some")
