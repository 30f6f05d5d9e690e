"""Reference preparation, noised negatives, combining features, saved embeddings and face embeddings: each piece's
promise, and the errors that name what was expected and found."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from ipadapter import IPAdapter
from ipadapter.combine import combine_features
from ipadapter.embeds import load_embeds, save_embeds
from ipadapter.faces import FaceEmbedder
from ipadapter.noise import noised_reference
from ipadapter.references import prepare


def _wide(w=90, h=30):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 3] = (255, 0, 0)
    image[:, w // 3 : 2 * w // 3] = (0, 255, 0)
    image[:, 2 * w // 3 :] = (0, 0, 255)
    return Image.fromarray(image)


def _mean(image):
    return np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)


def test_preparation_modes_keep_what_they_promise():
    wide = _wide()
    (crop,) = prepare(wide, "center_crop", 32)
    assert crop.size == (32, 32) and _mean(crop)[1] > 200 and _mean(crop)[0] < 30  # only the green middle
    (squash,) = prepare(wide, "squash", 32)
    assert squash.size == (32, 32) and all(_mean(squash)[c] > 60 for c in range(3))  # all three colours kept
    (pad,) = prepare(wide, "pad", 30)
    assert np.asarray(pad)[:5].max() == 0 and np.asarray(pad)[15].max() == 255  # black bars above and below
    tiles = prepare(wide, "tiles", 32)
    assert len(tiles) == 3 and [int(np.argmax(_mean(t))) for t in tiles] == [0, 1, 2]  # left, middle, right
    assert len(prepare(Image.new("RGB", (64, 64)), "tiles", 32, tile_grid=2)) == 4
    assert len(prepare(Image.new("RGB", (64, 64)), "tiles", 32, tile_grid=3.0)) == 9  # a whole float is a grid too
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=rf"tile_grid must be a whole number >= 1 \(an N x N grid\), found {bad}"):
            prepare(Image.new("RGB", (64, 64)), "tiles", 32, tile_grid=bad)
    with pytest.raises(ValueError, match="unknown reference preparation 'crop'; expected one of center_crop"):
        prepare(wide, "crop")


@pytest.mark.parametrize("width", [100, 120, 135, 240, 250, 340, 350, 640])
def test_tiles_cover_the_whole_reference(width):
    # each column holds its own index (red: low byte, green: high byte), so a tile tells which columns it shows
    columns = np.tile(np.arange(width)[None, :], (100, 1))
    image = Image.fromarray(np.stack([columns % 256, columns // 256, 0 * columns], -1).astype(np.uint8))
    tiles = prepare(image, "tiles", 100)  # tiles along the width keep their 100 columns (no resampling)
    if width < 400 / 3:  # near-square: ComfyUI's 2 x 2 grid of the central square
        assert len(tiles) == 4
        return
    assert len(tiles) == -(-width // 100)  # the aspect ratio rounded up (ComfyUI's IPAdapterTiled count)
    seen = np.zeros(width, bool)
    for tile in tiles:
        pixels = np.asarray(tile).astype(np.int64)
        seen[pixels[0, :, 0] + 256 * pixels[0, :, 1]] = True
    assert seen.all()  # no column of the reference is left out (2 tiles on a 2.4:1 image showed 83%)


def test_noised_reference_is_deterministic_and_scales_with_strength():
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    assert np.array_equal(np.asarray(noised_reference(image, 0.0)), np.asarray(image))
    one, again = noised_reference(image, 0.5), noised_reference(image, 0.5)
    assert np.array_equal(np.asarray(one), np.asarray(again))
    diffs = [np.abs(np.asarray(noised_reference(image, s, kind), np.float32) - np.asarray(image, np.float32)).mean()
             for kind in ("fade", "dissolve", "gaussian") for s in (0.2, 0.8)]  # fmt: skip
    assert all(lo < hi for lo, hi in zip(diffs[::2], diffs[1::2]))
    with pytest.raises(ValueError, match=r"noise strength must be in \[0, 1\], found 2"):
        noised_reference(image, 2)


def test_combine_feature_math():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert torch.allclose(combine_features(x, "average"), torch.tensor([[1.5, 2.5]]))
    assert torch.allclose(combine_features(x, "add", [1.0, 2.0]), torch.tensor([[3.0, 6.0]]))
    assert torch.allclose(combine_features(x, "subtract"), torch.tensor([[3.0, 3.0]]))
    assert combine_features(x, "concat").shape == (2, 2)
    norm = combine_features(x, "norm_average")  # mean of the unit vectors (0.3, 0.9), times the mean norm (3)
    assert torch.allclose(norm, torch.tensor([[0.9, 2.7]]))
    assert torch.equal(combine_features(x, "max"), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(combine_features(x, "min", [1.0, 10.0]), torch.tensor([[0.0, 4.0]]))  # weighted first


def test_saved_embeddings_round_trip_and_refuse_another_encoder(tmp_path):
    features = torch.randn(2, 40)
    save_embeds(tmp_path / "e.safetensors", features, "pooled", encoder="tiny-vit")
    loaded, meta = load_embeds(tmp_path / "e.safetensors")
    assert torch.equal(loaded, features) and meta["encoder"] == "tiny-vit" and meta["feature"] == "pooled"
    adapter = IPAdapter.for_unet(_unet(), "base", image_embed_dim=40)
    load_embeds(tmp_path / "e.safetensors", adapter.config)
    other = IPAdapter.for_unet(_unet(), "base", image_embed_dim=64)
    with pytest.raises(ValueError, match="holds 40-d pooled features .* reads 64-d pooled features"):
        load_embeds(tmp_path / "e.safetensors", other.config)
    plus = IPAdapter.for_unet(_unet(), "plus", image_embed_dim=40)
    with pytest.raises(ValueError, match="reads 40-d penultimate features"):
        load_embeds(tmp_path / "e.safetensors", plus.config)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_embeds(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an image-prompt embeddings file"):
        load_embeds(tmp_path / "other.safetensors")


def _unet():
    from tiny_models import tiny_unet

    return tiny_unet("sd15")


def test_face_embedder_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # not installed
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(ImportError, match="pip install insightface onnxruntime"):
        FaceEmbedder(root=tmp_path)
    fake = types.ModuleType("insightface.app")
    fake.FaceAnalysis = object
    monkeypatch.setitem(sys.modules, "insightface", types.ModuleType("insightface"))
    monkeypatch.setitem(sys.modules, "insightface.app", fake)
    with pytest.raises(FileNotFoundError, match=r"model pack 'buffalo_l' not found: expected .onnx files in .*models/buffalo_l"):
        FaceEmbedder(root=tmp_path)


def test_references_per_prompt_rules():
    from ipadapter.prompter import load_mask, references_per_prompt

    a, b, c = (Image.new("RGB", (4, 4), x) for x in ("red", "green", "blue"))
    assert references_per_prompt(a, 3) == [[a], [a], [a]]  # one reference for every prompt
    assert references_per_prompt([a, b], 2) == [[a], [b]]  # one per prompt
    assert references_per_prompt([a, b], 1) == [[a, b]]  # several for the one prompt
    assert references_per_prompt([[a, b], [c]], 2) == [[a, b], [c]]
    features = torch.randn(2, 8)  # pooled features of two prompts
    assert [r[0].shape for r in references_per_prompt(features, 2)] == [(8,), (8,)]
    assert len(references_per_prompt(torch.randn(8), 2)) == 2  # one pooled feature vector for both prompts
    with pytest.raises(ValueError, match=r"one reference image, or one per prompt \(3\), found 2; to give a prompt"):
        references_per_prompt([a, b], 3)
    with pytest.raises(ValueError, match="a mask must be \\(height, width\\), found shape \\(2, 3, 4\\)"):
        load_mask(torch.zeros(2, 3, 4))
    assert load_mask(Image.new("L", (4, 2), 255)).tolist() == [[1.0] * 4] * 2


def test_stacked_masks_are_read_from_arrays_and_from_diffusers_mask_processor_output():
    """Per-prompt masks as an (N, H, W) array are read as the same tensor is (an array was refused as not (H, W)),
    and diffusers' `IPAdapterMaskProcessor.preprocess` output, (N, 1, H, W), is N masks."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    from ipadapter.prompter import masks_tensor

    left = np.zeros((2, 8, 8), np.float32)
    left[0, :, :4] = left[1, :, 4:] = 1.0
    expected = masks_tensor(torch.from_numpy(left), 2)
    assert expected.shape == (2, 8, 8)
    assert torch.equal(masks_tensor(left, 2), expected)
    assert torch.equal(masks_tensor(left[:, ::-1], 2), expected.flip(1))  # a flipped array (negative strides)
    assert torch.equal(masks_tensor(left[:1] > 0.5, 1), expected[:1])  # a boolean array
    images = [Image.fromarray((m * 255).astype(np.uint8)) for m in left]
    processed = IPAdapterMaskProcessor().preprocess(images, height=8, width=8)  # (2, 1, 8, 8)
    assert torch.equal(masks_tensor(processed, 2), expected)
    assert torch.equal(masks_tensor(processed[:1], 1), expected[:1])
    with pytest.raises(ValueError, match=r"found shape \(2, 3, 8, 8\) \(several masks: a list, or an \(N, height, width\)"):
        masks_tensor(np.zeros((2, 3, 8, 8), np.float32), 2)
