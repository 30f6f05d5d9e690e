"""Generation controls on a whole pipeline: parity with diffusers where it has the control, and the exact
properties each control promises (a zero mask is no adapter, batch items keep their own references, ...)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_sd_folder

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompt, ImagePrompter

STEPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("controls")
    base, encoder_folder = make_sd_folder(root)

    def pipeline(with_encoder: bool):
        extra = {}
        if with_encoder:  # diffusers' built-in IP-Adapter path (its unload removes the encoder: one per test)
            extra = {"image_encoder": CLIPVisionModelWithProjection.from_pretrained(encoder_folder),
                     "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28})}  # fmt: skip
        p = StableDiffusionPipeline.from_pretrained(base, **extra)
        p.scheduler = DDIMScheduler.from_config(p.scheduler.config)
        p.set_progress_bar_config(disable=True)
        return p

    ours, theirs = pipeline(False), lambda: pipeline(True)
    encoder = ImageEncoder.from_pretrained(encoder_folder)
    adapters = {}
    for variant in ("base", "plus"):
        torch.manual_seed(1 if variant == "base" else 2)
        adapter = IPAdapter.for_unet(ours.unet, variant, image_embed_dim=encoder.feature_dim(
            "pooled" if variant == "base" else "penultimate"))
        with torch.no_grad():
            for param in adapter.parameters():
                param.add_(0.2 * torch.randn_like(param))
        adapter.save(root / f"{variant}.bin", layout="official")
        adapters[variant] = root / f"{variant}.bin"
    return ours, theirs, encoder, adapters


def _refs():
    a = Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 20).convert("RGB")
    b = Image.linear_gradient("L").resize((32, 32)).convert("RGB")
    c = Image.radial_gradient("L").resize((32, 32)).convert("RGB")
    return a, b, c


def _run(pipe, seed=1, **kwargs):
    kwargs.setdefault("prompt", "")
    return pipe(num_inference_steps=STEPS, output_type="np", generator=torch.Generator("cpu").manual_seed(seed),
                **kwargs).images  # fmt: skip


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_block_dicts_several_images_and_masks_match_diffusers(setup, variant):
    from diffusers.image_processor import IPAdapterMaskProcessor

    ours, make_theirs, encoder, adapters = setup
    theirs = make_theirs()
    theirs.load_ip_adapter(str(adapters[variant].parent), subfolder="", weight_name=adapters[variant].name,
                           image_encoder_folder=None)  # fmt: skip
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters[variant]), encoder)
    a, b, _ = _refs()
    try:
        blocks = {"down": {"block_1": [0.0, 1.0]}, "up": {"block_2": [0.5, 0.0, 1.0]}}
        theirs.set_ip_adapter_scale(blocks)
        expected = _run(theirs, ip_adapter_image=a)
        found = _run(prompter, image=a, scale=blocks)
        assert abs(expected - found).max() <= 1e-5

        theirs.set_ip_adapter_scale(0.8)
        expected = _run(theirs, ip_adapter_image=[[a, b]])  # two images for one adapter: tokens concatenated
        found = _run(prompter, image=[a, b], scale=0.8)
        assert abs(expected - found).max() <= 1e-5

        left = np.zeros((16, 16), np.uint8)
        left[:, :8] = 255
        masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(left), Image.fromarray(255 - left)], height=16, width=16)
        expected = _run(theirs, ip_adapter_image=[[a, b]],
                        cross_attention_kwargs={"ip_adapter_masks": [masks.reshape(1, 2, 16, 16)]})  # fmt: skip
        found = _run(prompter, image=[a, b], scale=0.8, regions=[masks[0, 0], masks[1, 0]])
        assert abs(expected - found).max() <= 1e-5
        single = _run(prompter, image=a, scale=0.8, mask=masks[0, 0])
        assert abs(single - found).max() > 1e-4  # the second region really acted
        # encoder masks, one per reference, stay with their reference in its region (all-white: unchanged)
        white, black = np.ones((8, 8), np.float32), np.zeros((8, 8), np.float32)
        kept = _run(prompter, image=[a, b], scale=0.8, regions=[masks[0, 0], masks[1, 0]], image_mask=[white, white])
        assert abs(kept - found).max() <= 1e-6
        hidden = _run(prompter, image=[a, b], scale=0.8, regions=[masks[0, 0], masks[1, 0]], image_mask=[white, black])
        left_half = (slice(None), slice(None), slice(0, 8))  # (N, H, W, C) images: region 0 is the left half
        assert abs(hidden - found)[left_half].max() < abs(hidden - found).max()  # b's region changed the most
    finally:
        prompter.detach()


def test_zero_mask_is_no_adapter_and_full_mask_is_no_mask(setup):
    ours, _, encoder, adapters = setup
    a, _, _ = _refs()
    plain = _run(ours)
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        unmasked = _run(prompter, image=a)
        assert abs(_run(prompter, image=a, mask=torch.zeros(16, 16)) - plain).max() <= 1e-6
        assert abs(_run(prompter, image=a, mask=torch.ones(16, 16)) - unmasked).max() <= 1e-6
        assert abs(unmasked - plain).max() > 1e-3
        with pytest.raises(ValueError, match=r"mask values must be in \[0, 1\], found \[0.0, 255.0\]"):
            _run(prompter, image=a, mask=torch.full((16, 16), 255.0).index_fill_(0, torch.tensor([0]), 0.0))
    finally:
        prompter.detach()


def test_regions_are_the_masked_prompts_of_their_references_with_presets_negatives_and_tiles(setup):
    """Region j is the image prompt of reference j alone, masked to region j: an all-white region is that prompt
    unmasked, an all-black one nothing. So a precise preset's unconditional-side group is masked too, one negative
    image per reference goes with its reference, and tiles keep their `combine` (and take one weight per region)."""
    ours, _, encoder, adapters = setup
    a, b, c = _refs()
    wide = Image.effect_mandelbrot((96, 32), (-2, -1.2, 1, 1.2), 20).convert("RGB")
    white, black = torch.ones(16, 16), torch.zeros(16, 16)
    plain = _run(ours)
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        precise = _run(prompter, image=a, preset="style_precise", boost=1.0)
        assert abs(_run(prompter, image=[a, b], regions=[white, black], preset="style_precise", boost=1.0)
                   - precise).max() <= 1e-5  # fmt: skip
        assert abs(_run(prompter, image=a, regions=[black], preset="style_precise", boost=1.0) - plain).max() <= 1e-6
        negative = _run(prompter, image=a, negative_image=c)
        assert abs(_run(prompter, image=[a, b], regions=[white, black], negative_image=[c, b]) - negative).max() <= 1e-5
        tiled = _run(prompter, image=wide, prep="tiles", combine="average", scale=0.5)
        found = _run(prompter, image=[wide, b], regions=[white, black], prep="tiles", combine="average", weights=[0.5, 1])
        assert abs(found - tiled).max() <= 1e-5
        assert abs(tiled - _run(prompter, image=wide, prep="tiles", scale=0.5)).max() > 1e-4  # (concat differs)
    finally:
        prompter.detach()


def test_batch_items_keep_their_own_references(setup):
    """diffusers issue #9813: per-sample references in one batch must not mix."""
    ours, _, encoder, adapters = setup
    a, b, _ = _refs()
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["plus"]), encoder)
    try:
        gens = [torch.Generator("cpu").manual_seed(5), torch.Generator("cpu").manual_seed(6)]
        batch = ours_batch = prompter(image=[a, b], prompt=["", ""], num_inference_steps=STEPS, output_type="np",
                                      generator=gens).images  # fmt: skip
        alone_a = _run(prompter, seed=5, image=a)
        alone_b = _run(prompter, seed=6, image=b)
        assert abs(batch[0] - alone_a[0]).max() <= 1e-5 and abs(ours_batch[1] - alone_b[0]).max() <= 1e-5
        swapped = prompter(image=[b, a], prompt=["", ""], num_inference_steps=STEPS, output_type="np",
                           generator=[torch.Generator("cpu").manual_seed(5), torch.Generator("cpu").manual_seed(6)]).images
        assert abs(swapped[0] - batch[0]).max() > 1e-3
    finally:
        prompter.detach()


def test_two_adapters_at_once_each_with_its_own_prompt(setup):
    ours, _, encoder, adapters = setup
    a, b, _ = _refs()
    only_base = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    expected = _run(only_base, image=a, scale=0.7)
    only_base.detach()
    both = ImagePrompter(ours, [IPAdapter.from_file(adapters["base"]), IPAdapter.from_file(adapters["plus"])],
                         [encoder, encoder])  # fmt: skip
    try:
        off = _run(both, prompts=[ImagePrompt(image=a, scale=0.7), ImagePrompt(image=b, scale=0.0)])
        assert abs(off - expected).max() <= 1e-6
        on = _run(both, prompts=[ImagePrompt(image=a, scale=0.7), ImagePrompt(image=b, scale=0.7)])
        assert abs(on - expected).max() > 1e-3
        with pytest.raises(ValueError, match=r"one ImagePrompt per adapter \(2\), found 1"):
            _run(both, prompts=[ImagePrompt(image=a)])
    finally:
        both.detach()


def test_composition_image_equal_to_the_style_image_is_the_single_image_preset(setup):
    ours, _, encoder, adapters = setup
    a, b, _ = _refs()
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        single = _run(prompter, image=a, preset="style_and_composition", scale=0.9, composition_scale=0.6)
        two = _run(prompter, image=a, composition_image=a, preset="style_and_composition", scale=0.9,
                   composition_scale=0.6)  # fmt: skip
        assert abs(single - two).max() <= 1e-5
        other = _run(prompter, image=a, composition_image=b, preset="style_and_composition", scale=0.9,
                     composition_scale=0.6)  # fmt: skip
        assert abs(other - single).max() > 1e-4
        strong = _run(prompter, image=a, preset="strong_style_and_composition", scale=0.9, composition_scale=0.6)
        assert abs(strong - _run(prompter, image=a, composition_image=a, preset="strong_style_and_composition",
                                 scale=0.9, composition_scale=0.6)).max() <= 1e-5  # fmt: skip
        with pytest.raises(ValueError, match="composition_image needs preset 'style_and_composition'"):
            _run(prompter, image=a, composition_image=b, preset="style")
    finally:
        prompter.detach()


def test_combine_modes_and_weights(setup):
    ours, _, encoder, adapters = setup
    a, b, c = _refs()
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        fa, fb = prompter.features([a]), prompter.features([b])
        averaged_features = (fa + fb) / 2
        assert abs(_run(prompter, image=[a, b], combine="average") - _run(prompter, image=averaged_features[0])).max() <= 1e-5
        weighted = _run(prompter, image=[a, b], combine="add", weights=[0.25, 0.75])
        assert abs(weighted - _run(prompter, image=(0.25 * fa + 0.75 * fb)[0])).max() <= 1e-5
        sub = _run(prompter, image=[a, b, c], combine="subtract")
        fc = prompter.features([c])
        assert abs(sub - _run(prompter, image=(fa - (fb + fc) / 2)[0])).max() <= 1e-5
        with pytest.raises(ValueError, match="unknown combine mode 'mean'"):
            _run(prompter, image=[a, b], combine="mean")
        with pytest.raises(ValueError, match=r"one weight per reference image \(2\), found 3"):
            _run(prompter, image=[a, b], combine="average", weights=[1, 1, 1])
    finally:
        prompter.detach()


@pytest.mark.parametrize("mode", ["average", "add", "subtract", "norm_average", "max"])
def test_combining_references_keeps_the_empty_image_as_the_unconditional_prompt(setup, mode):
    ours, _, encoder, adapters = setup
    a, b, c = _refs()
    adapter = IPAdapter.from_file(adapters["plus"])  # Plus: the empty image's features are not zero
    prompter = ImagePrompter(ours, adapter, encoder)
    try:
        with torch.no_grad():
            empty = adapter.project(image=encoder.unconditional("penultimate", 1))
            _, uncond = prompter._prompt_tokens(0, [a, b, c], None, None, ImagePrompt(image=[a, b, c], combine=mode), 0)
        assert torch.allclose(uncond, empty, atol=1e-6)  # as ComfyUI (uncond[0]); "add" gave 3x, "subtract" zeros
    finally:
        prompter.detach()


def test_negative_images_and_noised_references_change_only_the_unconditional_branch(setup):
    ours, _, encoder, adapters = setup
    a, b, _ = _refs()
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        base = _run(prompter, image=a)
        negative = _run(prompter, image=a, negative_image=b)
        noised = _run(prompter, image=a, negative_noise=0.5)
        assert abs(base - negative).max() > 1e-4 and abs(base - noised).max() > 1e-4
        # without guidance there is no unconditional branch: a negative would change nothing, and is refused
        for negative in ({"negative_image": b}, {"negative_noise": 0.5}):
            with pytest.raises(ValueError, match=f"{next(iter(negative))} sets the unconditional image prompt, which "
                                                 "only classifier-free guidance uses, and guidance_scale <= 1"):
                _run(prompter, image=a, guidance_scale=1.0, **negative)
        _run(prompter, image=a, guidance_scale=1.0)  # the same prompter still runs
    finally:
        prompter.detach()


def test_negative_noise_does_not_depend_on_the_reference_size(setup):
    ours, _, encoder, adapters = setup
    a, _, _ = _refs()
    big = a.resize((a.width * 16, a.height * 16), Image.Resampling.NEAREST)  # the same picture, 16x the side
    adapter = IPAdapter.from_file(adapters["base"])
    prompter = ImagePrompter(ours, adapter, encoder)
    try:
        def noise_reaching_the_encoder(image):  # unconditional tokens: noised reference vs clean reference
            with torch.no_grad():
                _, noised = prompter._prompt_tokens(0, [image], None, None, ImagePrompt(image=image, negative_noise=0.5), 0)
                _, clean = prompter._prompt_tokens(0, [image], [image], None, ImagePrompt(image=image), 0)
            return float((noised - clean).norm())

        small, large = noise_reaching_the_encoder(a), noise_reaching_the_encoder(big)
        assert 0.7 < large / small < 1.4  # noised at the encoder's input size, as ComfyUI's IPAdapterNoise
        # (224 x 224); noised at the reference's own size, the 16x picture's noise was averaged to 0.46x
    finally:
        prompter.detach()


def test_instantstyle_content_subtraction_removes_a_text_embedding(setup):
    ours, _, encoder, adapters = setup
    a, _, _ = _refs()
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        content = torch.randn(encoder.pooled_dim, generator=torch.Generator().manual_seed(0))
        found = _run(prompter, image=a, content_embeds=content, content_scale=0.5)
        expected = _run(prompter, image=(prompter.features([a])[0] - 0.5 * content))
        assert abs(found - expected).max() <= 1e-5
        with pytest.raises(ValueError, match="content embedding is 3-d; the image embeddings are"):
            _run(prompter, image=a, content_embeds=torch.ones(3))
    finally:
        prompter.detach()
    plus = ImagePrompter(ours, IPAdapter.from_file(adapters["plus"]), encoder)
    try:
        with pytest.raises(ValueError, match="works on global image embeddings only"):
            _run(plus, image=a, content_embeds=torch.ones(encoder.pooled_dim))
    finally:
        plus.detach()


def test_prompt_embeds_instead_of_prompt(setup):
    ours, _, encoder, adapters = setup
    a, _, _ = _refs()
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        positive, negative = ours.encode_prompt("a red shape", "cpu", 1, True, "")
        expected = _run(prompter, image=a, prompt="a red shape")
        found = _run(prompter, image=a, prompt=None, prompt_embeds=positive, negative_prompt_embeds=negative)
        assert abs(expected - found).max() <= 1e-6
    finally:
        prompter.detach()


def test_precise_preset_moves_the_reference_to_the_unconditional_side(setup):
    ours, _, encoder, adapters = setup
    a, _, _ = _refs()
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        style = _run(prompter, image=a, preset="style")
        assert abs(_run(prompter, image=a, preset="style_precise", boost=0.0) - style).max() <= 1e-6
        assert abs(_run(prompter, image=a, preset="style_precise", boost=1.0) - style).max() > 1e-4
        # without guidance there is no unconditional side: the precise preset is the plain one
        no_cfg = _run(prompter, image=a, preset="style", guidance_scale=1.0)
        assert abs(_run(prompter, image=a, preset="style_precise", guidance_scale=1.0) - no_cfg).max() <= 1e-6
    finally:
        prompter.detach()


def test_a_mask_of_another_aspect_ratio_is_stretched_over_the_image(setup):
    """A mask whose aspect ratio is not the output's (a user's 4:1 drawing of "the left half" for a square image)
    acts as the same mask drawn at the output's size: it is stretched over each layer's grid, read from the latent's
    size before each UNet call. diffusers' rule (the grid from the mask's aspect ratio, the rest zero-padded) would
    put it on diagonal bands: 10x further from the square mask's image here, measured."""
    import warnings

    ours, _, encoder, adapters = setup
    a, _, _ = _refs()
    square = torch.zeros(16, 16)
    square[:, :8] = 1.0  # white: the left half
    wide = torch.zeros(10, 40)
    wide[:, :20] = 1.0
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        unmasked = _run(prompter, image=a)
        at_size = _run(prompter, image=a, mask=square)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*line up")  # no misfit warning: the mask fits every layer
            stretched = _run(prompter, image=a, mask=wide)
    finally:
        prompter.detach()
    # equal up to resampling the mask's edge from another size
    assert abs(stretched - at_size).max() < 0.25 * abs(unmasked - at_size).max()


def test_layer_grids_follow_the_latent_and_a_misfit_mask_warns():
    from ipadapter.state import downsample_mask, layer_grid

    assert [layer_grid((13, 9), q) for q in (117, 35, 12, 4, 5)] == [(13, 9), (7, 5), (4, 3), (2, 2), None]
    left = torch.zeros(1, 20, 40)
    left[:, :, :20] = 1.0
    weights = downsample_mask(left, 64, latent=(8, 8)).reshape(8, 8)
    assert weights[:, :4].min() > 0.9 and weights[:, 4:].max() < 0.1  # every row: left half in, right half out
    with pytest.warns(UserWarning, match="will not line up with the image"):
        downsample_mask(left, 64)  # size unknown: diffusers' rule, which cannot fit a 2:1 mask on 64 positions


def test_a_mask_of_the_outputs_aspect_is_diffusers_grid_except_where_a_level_was_rounded_up(setup, monkeypatch):
    """24x16 px (tiny VAE x2): latent 12x8 -> 6x4 -> 3x2 -> middle 2x1. diffusers derives the middle layer's grid
    from the mask's aspect ratio (1x2, the mask on the wrong positions); ours reads it from the latent (2x1). With
    the latent's size unknown ours falls back to diffusers' rule: then the pixels are diffusers'."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    from ipadapter.state import layer_grid, mask_grid

    assert layer_grid((12, 8), 2) == (2, 1) and mask_grid(24, 16, 2) == (1, 2)
    ours, make_theirs, encoder, adapters = setup
    a, _, _ = _refs()
    left = np.zeros((24, 16), np.uint8)
    left[:, :8] = 255
    mask = IPAdapterMaskProcessor().preprocess([Image.fromarray(left)], height=24, width=16)  # (1, 1, 24, 16)
    theirs = make_theirs()
    theirs.load_ip_adapter(str(adapters["base"].parent), subfolder="", weight_name=adapters["base"].name,
                           image_encoder_folder=None)  # fmt: skip
    theirs.set_ip_adapter_scale(0.8)
    size = {"height": 24, "width": 16}
    expected = _run(theirs, ip_adapter_image=a, cross_attention_kwargs={"ip_adapter_masks": [mask]}, **size)
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        found = _run(prompter, image=a, scale=0.8, mask=mask[0, 0], **size)
        assert abs(expected - found).max() > 1e-4  # the middle layer's mask sits elsewhere
        monkeypatch.setattr(ImagePrompter, "_track_step", lambda *args, **kwargs: None)  # latent size unknown
        fallback = _run(prompter, image=a, scale=0.8, mask=mask[0, 0], **size)
        assert abs(expected - fallback).max() <= 1e-5
    finally:
        prompter.detach()


def test_a_negative_image_with_tiled_references_is_encoded_whole_for_every_tile(setup):
    """prep="tiles" cuts 3 tiles from a 3:1 reference and a 2 x 2 grid from a square negative: the negative is not
    tiled but encoded whole and stands for every tile of its reference (ComfyUI's IPAdapterTiled gives its
    image_negative to every tile), so any negative fits any reference."""
    ours, _, encoder, adapters = setup
    a, b, c = _refs()
    wide = Image.effect_mandelbrot((96, 32), (-2, -1.2, 1, 1.2), 20).convert("RGB")
    prompter = ImagePrompter(ours, IPAdapter.from_file(adapters["base"]), encoder)
    try:
        found = _run(prompter, image=wide, prep="tiles", combine="average", negative_image=c)
        # the same from the features: the tiles' mean as the reference, the whole negative as the unconditional one
        tiles = prompter.features([wide], prep="tiles")
        assert tiles.shape[0] == 3
        expected = _run(prompter, image=tiles.mean(0), negative_image=prompter.features([c])[0])
        assert abs(found - expected).max() <= 1e-5
        assert abs(found - _run(prompter, image=wide, prep="tiles", combine="average")).max() > 1e-4  # it acted
        # one negative per reference: each stands for the tiles of its own reference (3 + 4 tiles, concatenated)
        (group,) = prompter.groups(0, ImagePrompt(image=[wide, b], prep="tiles", negative_image=[c, a]), 1, True)
        assert group.uncond.shape == group.cond.shape
        whole = prompter.adapter.project(image=prompter.features([c, a]))  # (2, T, C)
        t = whole.shape[1]
        assert torch.allclose(group.uncond[0, : 3 * t], whole[0].repeat(3, 1), atol=1e-6)
        assert torch.allclose(group.uncond[0, 3 * t :], whole[1].repeat(4, 1), atol=1e-6)
        with pytest.raises(ValueError, match=r"one negative image, or one per reference \(2\), found 3"):
            prompter.groups(0, ImagePrompt(image=[wide, b], prep="tiles", negative_image=[c, a, b]), 1, True)
    finally:
        prompter.detach()
