"""Tiny-world metrics: concept preservation, prompt following and batch scores."""

import dataclasses

import pytest

from ipadapter.tinyworld.metrics import concept_preservation, prompt_following, score_batch
from ipadapter.tinyworld.world import ATTRIBUTES, Scene, parse_caption, render

REF = Scene(shape="star", color="green", pattern="dotted", background="gray", size="large", position="top")


def test_concept_preservation_known_cases():
    assert concept_preservation(REF, REF) == 1.0
    n = len(ATTRIBUTES)
    assert concept_preservation(REF, dataclasses.replace(REF, color="red")) == pytest.approx((n - 1) / n)
    assert concept_preservation(REF, dataclasses.replace(REF, color="red"), ["shape", "color"]) == 0.5


def test_prompt_following_through_the_reader():
    from ipadapter.tinyworld.reader import load_reader

    stated = parse_caption("a large red striped circle on the left on a pink background")
    scene = Scene(**stated)  # the caption states every attribute
    generated = load_reader().predict([render(scene, seed=11)])[0]
    assert prompt_following(stated, generated) == 1.0
    assert prompt_following({"color": "red", "shape": "square"}, generated) == 0.5


def test_metric_errors():
    with pytest.raises(ValueError, match="stated is empty"):
        prompt_following({}, REF)
    with pytest.raises(ValueError, match=r"stated 'color' must be one of .* found 'teal'"):
        prompt_following({"color": "teal"}, REF)
    with pytest.raises(ValueError, match=r"unknown attributes \['hue'\]"):
        concept_preservation(REF, REF, ["hue"])
    with pytest.raises(ValueError, match="attributes is empty"):
        concept_preservation(REF, REF, [])
    with pytest.raises(ValueError, match=r"one generated scene per reference \(2\); found 1"):
        score_batch([REF, REF], [REF])


def test_score_batch_means_and_product():
    other = dataclasses.replace(REF, color="red", shape="circle")  # keeps 4 of 6
    scores = score_batch(
        references=[REF, REF],
        generated=[REF, other],
        stated=[{"color": "green"}, {}],  # the second sample has no text, so it is left out of PF
    )
    assert scores.cp == pytest.approx((1.0 + 4 / 6) / 2)
    assert scores.pf == 1.0 and scores.num_with_prompt == 1
    assert scores.cp_x_pf == pytest.approx(scores.cp * scores.pf)
    assert scores.cp_per_attribute["color"] == 0.5 and scores.cp_per_attribute["size"] == 1.0
    assert score_batch([REF], [REF]).pf is None and score_batch([REF], [REF]).cp_x_pf is None
