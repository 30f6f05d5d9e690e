"""Per-block weights: the community presets on the real SD1.5 / SDXL layer layouts, and diffusers' block dicts."""

from __future__ import annotations

import pytest
from tiny_models import real_unet_on_meta, tiny_unet

from ipadapter.blocks import PRESETS, block_dict_weights, family, layer_weights, preset_weights, transformers
from ipadapter.layers import cross_attention_layers


@pytest.fixture(scope="module")
def names():
    return {f: [layer.name for layer in cross_attention_layers(real_unet_on_meta(f))] for f in ("sd15", "sdxl")}


def _by_transformer(layer_names, weights):
    out = {}
    for name, w in zip(layer_names, weights):
        t = name.split(".transformer_blocks")[0]
        assert out.setdefault(t, w) == w  # every depth block of a transformer shares one weight
    return out


def test_transformer_order_is_input_middle_output(names):
    sd15, sdxl = transformers(names["sd15"]), transformers(names["sdxl"])
    assert len(sd15) == 16 and len(sdxl) == 11
    assert sd15[6] == "mid_block.attentions.0" and sdxl[4] == "mid_block.attentions.0"
    assert sdxl[3] == "down_blocks.2.attentions.1" and sdxl[6] == "up_blocks.0.attentions.1"
    assert family(names["sd15"]) == "sd15" and family(names["sdxl"]) == "sdxl"


def test_sdxl_style_and_composition_are_instantstyles_blocks(names):
    layer_names = names["sdxl"]
    style = _by_transformer(layer_names, preset_weights(layer_names, "style", 0.8))
    assert {t for t, w in style.items() if w} == {"up_blocks.0.attentions.1"} and style["up_blocks.0.attentions.1"] == 0.8
    both = _by_transformer(layer_names, preset_weights(layer_names, "style_and_composition", 1.0, 0.5))
    assert {t: w for t, w in both.items() if w} == {"up_blocks.0.attentions.1": 1.0, "down_blocks.2.attentions.1": 0.5}
    strong = _by_transformer(layer_names, preset_weights(layer_names, "strong_style", 1.0))
    assert [t for t, w in strong.items() if not w] == ["down_blocks.2.attentions.1"]


def test_sd15_presets_follow_the_community_table(names):
    layer_names = names["sd15"]
    order = transformers(layer_names)
    style = _by_transformer(layer_names, preset_weights(layer_names, "style"))
    assert sorted(order.index(t) for t, w in style.items() if w) == [0, 1, 2, 3, *range(9, 16)]
    comp = _by_transformer(layer_names, preset_weights(layer_names, "composition", 1.0))
    assert {t: w for t, w in comp.items() if w} == {"down_blocks.2.attentions.0": 0.25, "down_blocks.2.attentions.1": 1.0}
    ease_in = _by_transformer(layer_names, preset_weights(layer_names, "ease_in"))
    assert [round(ease_in[t], 2) for t in order][:4] == [1.0, 0.94, 0.88, 0.82]
    assert round(ease_in[order[15]], 2) == 0.11
    weak_middle = _by_transformer(layer_names, preset_weights(layer_names, "weak_middle", 2.0))
    assert weak_middle["mid_block.attentions.0"] == pytest.approx(0.4) and weak_middle[order[0]] == 2.0


def test_every_preset_gives_one_weight_per_layer_on_any_unet():
    layer_names = [layer.name for layer in cross_attention_layers(tiny_unet("sd15"))]
    for preset in PRESETS:
        weights = preset_weights(layer_names, preset, 0.7)
        assert len(weights) == len(layer_names) and any(w > 0 for w in weights), preset
    with pytest.raises(ValueError, match="unknown preset 'stlye'; expected one of linear"):
        preset_weights(layer_names, "stlye")


def test_scale_forms_and_a_scale_given_as_text_is_named(names):
    layers = names["sd15"]
    assert layer_weights(layers, 0.5) == [0.5] * 16
    assert layer_weights(layers, [0.1 * i for i in range(16)]) == pytest.approx([0.1 * i for i in range(16)])
    with pytest.raises(ValueError, match=r"expected one scale per adapted layer \(16\), found 2"):
        layer_weights(layers, [1.0, 0.5])
    with pytest.raises(TypeError, match="scale must be a number, one number per adapted layer or a diffusers block "
                                        "dict; found '0.5'"):  # fmt: skip
        layer_weights(layers, "0.5")  # a string is a sequence of characters, not of scales


def test_block_dicts_expand_like_diffusers(names):
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    unet = real_unet_on_meta("sdxl")
    layer_names = names["sdxl"]
    for scales in ({"up": {"block_0": [0.0, 1.0, 0.0]}}, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
                   {"down": 0.5, "mid": 0.25, "up": {"block_1": 0.75}}, {"up": {"block_1": [0.5]}},
                   {"down": {"block_0": 1.0, "block_1": [0.5]}},  # (SDXL's block_0 has no cross-attention)
                   {"down": [0.0, 1.0], "up": [0.0, 1.0, 0.5]}, {"down": [0.5], "mid": [0.25]}):  # fmt: skip
        (expanded,) = _maybe_expand_lora_scales(unet, [scales], default_scale=0.0)
        expected = []
        for name in layer_names:  # diffusers' set_ip_adapter_scale: the last matching prefix wins
            value = None
            for prefix, s in expanded.items():
                if name.startswith(prefix):
                    value = s
            expected.append(value)
        assert block_dict_weights(layer_names, scales) == expected
    with pytest.raises(ValueError, match="keys 'down', 'mid', 'up'; found \\['middle'\\]"):
        block_dict_weights(layer_names, {"middle": 1.0})
    with pytest.raises(ValueError, match="Expected 3 scales for up.block_1, got 4"):  # diffusers refuses it too
        _maybe_expand_lora_scales(unet, [{"up": {"block_1": [0, 1, 0, 5]}}], default_scale=0.0)
    with pytest.raises(ValueError, match=r"expected 3 scales for up.block_1 \(one per transformer\) or one for all, "
                                         r"found 4"):  # fmt: skip
        block_dict_weights(layer_names, {"up": {"block_1": [0, 1, 0, 5]}})
    with pytest.raises(ValueError, match=r"down takes keys block_0, block_1, ...; found 'blk_1'"):
        block_dict_weights(layer_names, {"down": {"blk_1": 1.0}})
    with pytest.raises(ValueError, match=r"expected 2 scales for down \(one per transformer of each block\) or one for "
                                         r"all, found 3"):  # fmt: skip
        block_dict_weights(layer_names, {"down": [0, 1, 0]})
    with pytest.raises(ValueError, match=r"up.block_0: per-image scale lists .* regions= and weights="):
        block_dict_weights(layer_names, {"up": {"block_0": [[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]]}})
    assert layer_weights(layer_names, 0.5) == [0.5] * 70


def test_precise_presets_follow_the_community_table(names):
    from ipadapter.blocks import precise_weights

    layer_names = names["sdxl"]
    positive, negative = precise_weights(layer_names, "style_precise", 1.0, 0.4)
    assert {t: w for t, w in _by_transformer(layer_names, positive).items() if w} == {"up_blocks.0.attentions.1": 1.0}
    assert {t: w for t, w in _by_transformer(layer_names, negative).items() if w} == {"down_blocks.2.attentions.1": 0.4}
    positive, negative = precise_weights(layer_names, "composition_precise", 0.8, 0.5)
    neg = _by_transformer(layer_names, negative)
    assert {t: w for t, w in _by_transformer(layer_names, positive).items() if w} == {"down_blocks.2.attentions.1": 0.8}
    assert neg["up_blocks.0.attentions.1"] == 0.5 and neg["down_blocks.2.attentions.1"] == 0.0
    assert neg["mid_block.attentions.0"] == pytest.approx(0.05)
    sd15 = names["sd15"]
    _, negative = precise_weights(sd15, "style_precise", 1.0, 1.0)
    assert {t: w for t, w in _by_transformer(sd15, negative).items() if w} == {
        "down_blocks.2.attentions.0": 0.25, "down_blocks.2.attentions.1": 1.0}


@pytest.mark.parametrize("family_name", ["sd15", "sdxl"])
def test_composition_presets_split_by_role_add_up_to_the_one_image_preset(names, family_name):
    layer_names = names[family_name]
    for preset in ("style_and_composition", "strong_style_and_composition"):
        whole = preset_weights(layer_names, preset, 0.8, 0.5)
        style, comp = preset_weights(layer_names, preset, 0.8, 0.0), preset_weights(layer_names, preset, 0.0, 0.5)
        assert [s + c for s, c in zip(style, comp)] == pytest.approx(whole)  # composition_image's two groups
    if family_name == "sd15":  # ComfyUI's "strong style and composition": {4: wc, 5: wc}, no quarter
        strong = _by_transformer(layer_names, preset_weights(layer_names, "strong_style_and_composition", 0.8, 0.5))
        assert strong["down_blocks.2.attentions.0"] == strong["down_blocks.2.attentions.1"] == 0.5
