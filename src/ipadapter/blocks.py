"""Per-block image-prompt weights: named presets (style, composition, curves) and diffusers-style block dicts.

Weights are set per *transformer* (a `Transformer2DModel`, e.g. `down_blocks.2.attentions.1`, whose depth blocks
all share one weight), indexed in the order ComfyUI_IPAdapter_plus and sd-webui-controlnet use: input (down)
blocks, then the middle block, then output (up) blocks. SD1.5 has 16 such transformers, SDXL 11; the result is one
λ per adapted cross-attention layer, in the adapter's (official) layer order.

Presets for SD1.5 and SDXL are the community's (ComfyUI_IPAdapter_plus `weight_type`; SDXL's style and composition
layers are InstantStyle's `up_blocks.0.attentions.1` and `down_blocks.2.attentions.1`). Transformers a dict preset
does not name get 0. Other UNets (e.g. the tiny world) get the structural analogue: composition = the transformers of
the deepest down level, style = every transformer at the two highest resolutions (SD1.5's choice); these roles are
measured, not assumed, on the tiny world (`benchmarks/block_roles.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

PRESETS = (
    "linear",
    "ease_in",
    "ease_out",
    "ease_in_out",
    "reverse_in_out",
    "weak_input",
    "weak_output",
    "weak_middle",
    "strong_middle",
    "style",
    "composition",
    "style_and_composition",
    "strong_style",
    "strong_style_and_composition",
)
PRECISE = ("style_precise", "composition_precise")  # presets that also move the reference to the unconditional side

_TRANSFORMER = re.compile(r"^(down_blocks\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.(\d+)|up_blocks\.(\d+)\.attentions\.(\d+))\.")


def transformer_of(layer_name: str) -> tuple[str, tuple[int, int, int]]:
    """"down_blocks.2.attentions.1.transformer_blocks.0.attn2" -> ("down_blocks.2.attentions.1", sort key)."""
    match = _TRANSFORMER.match(layer_name + ".")
    if match is None:
        raise ValueError(f"expected a UNet cross-attention layer inside down_blocks/mid_block/up_blocks, found {layer_name!r}")
    if match.group(2) is not None:
        key = (0, int(match.group(2)), int(match.group(3)))
    elif match.group(4) is not None:
        key = (1, 0, int(match.group(4)))
    else:
        key = (2, int(match.group(5)), int(match.group(6)))
    return match.group(1), key


def transformers(layer_names: Sequence[str]) -> list[str]:
    """The distinct transformers of the adapted layers, in input -> middle -> output order (the t index)."""
    found = {}
    for name in layer_names:
        transformer, key = transformer_of(name)
        found[transformer] = key
    return sorted(found, key=found.__getitem__)


def family(layer_names: Sequence[str]) -> str:
    """"sd15" (16 layers in 16 transformers), "sdxl" (70 layers in 11 transformers) or "generic"."""
    count = len(transformers(layer_names))
    if len(layer_names) == 16 and count == 16:
        return "sd15"
    if len(layer_names) == 70 and count == 11:
        return "sdxl"
    return "generic"


def _role_indices(names: list[str], fam: str) -> tuple[list[int], list[int], int]:
    """(style t indices, composition t indices, middle t index or -1) of the transformers `names`."""
    if fam == "sdxl":
        return [6], [3], 4
    if fam == "sd15":
        return [0, 1, 2, 3, *range(9, 16)], [4, 5], 6
    keys = [transformer_of(n + ".x")[1] for n in names]
    down = [t for t, k in enumerate(keys) if k[0] == 0]
    middle = next((t for t, k in enumerate(keys) if k[0] == 1), -1)
    deepest = max(keys[t][1] for t in down) if down else None
    composition = [t for t in down if keys[t][1] == deepest]
    up_levels = sorted({k[1] for k in keys if k[0] == 2})
    high_up = set(up_levels[-2:])  # the two highest-resolution up levels
    high_down = {lvl for lvl in sorted({keys[t][1] for t in down})[:2]}  # the two highest-resolution down levels
    style = [t for t, k in enumerate(keys) if (k[0] == 0 and k[1] in high_down and t not in composition)
             or (k[0] == 2 and k[1] in high_up)]  # fmt: skip
    return style, composition, middle


def preset_weights(
    layer_names: Sequence[str], preset: str, weight: float = 1.0, composition_weight: float | None = None
) -> list[float]:
    """λ per adapted layer for a named preset.

    Args:
        layer_names: the adapter's cross-attention layer names, in its layer order.
        preset: one of PRESETS.
        weight: the overall weight (the style weight for style presets).
        composition_weight: the composition weight of "style_and_composition" presets (default: `weight`).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    names = transformers(layer_names)
    fam = family(layer_names)
    count = len(names)
    wc = weight if composition_weight is None else composition_weight
    per_t = [0.0] * count
    kinds = [transformer_of(n + ".x")[1][0] for n in names]  # 0 input, 1 middle, 2 output
    style, composition, middle = _role_indices(names, fam)
    if preset == "linear":
        per_t = [weight] * count
    elif preset in ("ease_in", "ease_out", "ease_in_out", "reverse_in_out"):
        half = count / 2
        curve = {
            "ease_in": lambda t: 0.05 + 0.95 * (1 - t / count),
            "ease_out": lambda t: 0.05 + 0.95 * (t / count),
            "ease_in_out": lambda t: 0.05 + 0.95 * (1 - abs(t - half) / half),
            "reverse_in_out": lambda t: 0.05 + 0.95 * (abs(t - half) / half),
        }[preset]
        per_t = [weight * curve(t) for t in range(count)]
    elif preset.startswith(("weak_", "strong_middle")):
        weak = {"weak_input": (0,), "weak_output": (2,), "weak_middle": (1,), "strong_middle": (0, 2)}[preset]
        per_t = [weight * (0.2 if kind in weak else 1.0) for kind in kinds]
    elif preset == "style":
        for t in style:
            per_t[t] = weight
    elif preset == "composition":
        for t in composition:
            per_t[t] = wc
        if fam == "sd15" or (fam == "generic" and len(composition) > 1):
            per_t[composition[0]] = 0.25 * wc  # SD1.5: down_blocks.2.attentions.0 at a quarter
    elif preset == "style_and_composition":
        for t in style:
            per_t[t] = weight
        for t in composition:
            per_t[t] = wc
        if fam == "sd15" or (fam == "generic" and len(composition) > 1):
            per_t[composition[0]] = 0.25 * wc
    elif preset in ("strong_style", "strong_style_and_composition"):
        per_t = [weight] * count
        for t in composition:
            per_t[t] = wc if preset == "strong_style_and_composition" else 0.0
    weights_by_name = dict(zip(names, per_t))
    return [weights_by_name[transformer_of(n)[0]] for n in layer_names]


def precise_weights(layer_names: Sequence[str], preset: str, weight: float = 1.0,
                    boost: float | None = None) -> tuple[list[float], list[float]]:  # fmt: skip
    """(λ of the reference, λ of the reference used as a *negative*) per adapted layer, for the "precise" presets
    (ComfyUI_IPAdapter_plus): in the layers of the other role the reference goes to the unconditional side, so
    guidance pushes the generation away from its layout (style_precise) or its style (composition_precise) there.

    SDXL: style_precise = style block at `weight`, composition block negative at `boost`; composition_precise =
    composition block at `weight`, style block negative at `boost`, every other block negative at 0.1 * boost.
    SD1.5 and other UNets: the same with their style / composition sets (SD1.5's first composition block at 0.25).
    `boost` defaults to `weight`."""
    if preset not in PRECISE:
        raise ValueError(f"unknown precise preset {preset!r}; expected one of {', '.join(PRECISE)}")
    names = transformers(layer_names)
    fam = family(layer_names)
    b = weight if boost is None else boost
    style, composition, _ = _role_indices(names, fam)
    quarter = fam == "sd15" or (fam == "generic" and len(composition) > 1)
    positive, negative = [0.0] * len(names), [0.0] * len(names)
    if preset == "style_precise":
        for t in style:
            positive[t] = weight
        for i, t in enumerate(composition):
            negative[t] = 0.25 * b if quarter and i == 0 else b
    else:
        for i, t in enumerate(composition):
            positive[t] = 0.25 * weight if quarter and i == 0 else weight
        for t in range(len(names)):
            if t not in composition:
                negative[t] = b if t in style else 0.1 * b
    pos_by, neg_by = dict(zip(names, positive)), dict(zip(names, negative))
    return ([pos_by[transformer_of(n)[0]] for n in layer_names], [neg_by[transformer_of(n)[0]] for n in layer_names])


def block_dict_weights(layer_names: Sequence[str], scales: Mapping) -> list[float]:
    """λ per adapted layer from a diffusers `set_ip_adapter_scale` dict, e.g.
    {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}} (unnamed transformers get 0).

    "down"/"up" take a number (every block), a list (one number per transformer, the same for every block, or a
    one-element list for all of them, as diffusers expands it) or {"block_i": number, one number per transformer of
    block i, or a one-element list for all of them}; "mid" takes a number (or a one-element list). As diffusers, a
    list of another length is refused, a block without cross-attention ignored. diffusers' per-image lists (a list
    in place of a number, for masked images) are refused: `regions=` with `weights=` gives them."""
    unknown = set(scales) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"block weights take the keys 'down', 'mid', 'up'; found {sorted(unknown)}")
    per_block: dict[tuple[int, int], int] = {}  # (kind, block) -> its number of transformers
    for name in layer_names:
        _, (kind, block, index) = transformer_of(name)
        per_block[(kind, block)] = max(per_block.get((kind, block), 0), index + 1)
    for side, kind in (("down", 0), ("up", 2)):  # diffusers' rules (`_maybe_expand_lora_scales`)
        part = scales.get(side)
        if isinstance(part, (list, tuple)):  # diffusers: the same list for every block of that side
            counts = {c for (k, _), c in per_block.items() if k == kind}
            _check_numbers(side, part)
            for count in counts:
                if len(part) not in (1, count):
                    raise ValueError(f"expected {count} scales for {side} (one per transformer of each block) or one "
                                     f"for all, found {len(part)}")  # fmt: skip
            continue
        if not isinstance(part, Mapping):
            continue
        for key, value in part.items():
            if isinstance(value, (list, tuple)):
                _check_numbers(f"{side}.{key}", value)
            if not (key.startswith("block_") and key[6:].isdigit()):
                raise ValueError(f"{side} takes keys block_0, block_1, ...; found {key!r}")
            count = per_block.get((kind, int(key[6:])))  # None: no cross-attention there (ignored, as diffusers)
            if count is not None and isinstance(value, (list, tuple)) and len(value) not in (1, count):
                raise ValueError(f"expected {count} scales for {side}.{key} (one per transformer) or one for all, "
                                 f"found {len(value)}")  # fmt: skip
    result = []
    for name in layer_names:
        transformer, (kind, block, index) = transformer_of(name)
        part = scales.get(("down", "mid", "up")[kind], 0.0)
        if kind == 1:
            if isinstance(part, (list, tuple)):
                _check_numbers("mid", part)
                if len(part) != 1:
                    raise ValueError(f"expected 1 scale for mid, found {len(part)}")
                part = part[0]
            result.append(float(part))
            continue
        if isinstance(part, (list, tuple)):
            result.append(float(part[0] if len(part) == 1 else part[index]))
            continue
        if not isinstance(part, Mapping):
            result.append(float(part))
            continue
        value = part.get(f"block_{block}", 0.0)
        if isinstance(value, (list, tuple)):
            value = value[0] if len(value) == 1 else value[index]  # one number for all the block's transformers
        result.append(float(value))
    return result


def _check_numbers(where: str, values: Sequence) -> None:
    """A list of a block dict holds numbers; diffusers' per-image lists (for masked images) are named."""
    if any(isinstance(v, (list, tuple)) for v in values):
        raise ValueError(f"{where}: per-image scale lists (diffusers' form for masked images) are not block weights; "
                         "pass the block weights as scale= and the images with regions= and weights=")  # fmt: skip


def layer_weights(
    layer_names: Sequence[str],
    scale: float | Sequence[float] | Mapping = 1.0,
    preset: str | None = None,
    composition_scale: float | None = None,
) -> list[float]:
    """λ per adapted layer from a number, a per-layer list, a diffusers block dict, or a preset (times `scale`)."""
    if preset is not None:
        if not isinstance(scale, (int, float)):
            raise ValueError(f"a preset takes one number as scale, found {type(scale).__name__}")
        return preset_weights(layer_names, preset, float(scale), composition_scale)
    if isinstance(scale, Mapping):
        return block_dict_weights(layer_names, scale)
    if isinstance(scale, (int, float)):
        return [float(scale)] * len(layer_names)
    if isinstance(scale, (str, bytes)):
        raise TypeError(
            f"scale must be a number, one number per adapted layer or a diffusers block dict; found {scale!r:.40}"
        )
    scales = [float(s) for s in scale]
    if len(scales) != len(layer_names):
        raise ValueError(f"expected one scale per adapted layer ({len(layer_names)}), found {len(scales)}")
    return scales
