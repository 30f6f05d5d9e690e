"""The image encoder wrapper: official preprocessing, the outputs each variant reads, clear errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_models import tiny_clip_vision

from ipadapter import ImageEncoder, check_encoder
from ipadapter.config import AdapterConfig, ResamplerConfig
from ipadapter.images import load_image


def test_preprocessing_is_the_official_clip_image_processor(tmp_path):
    from transformers import CLIPImageProcessor

    encoder = ImageEncoder(tiny_clip_vision(image_size=224))
    image = Image.effect_mandelbrot((320, 200), (-2, -1.2, 1, 1.2), 50).convert("RGB")  # non-square
    official = CLIPImageProcessor()(images=image, return_tensors="pt").pixel_values  # what the official code uses
    assert torch.equal(encoder.preprocess(image), official)
    assert official.shape == (1, 3, 224, 224)


def test_features_and_unconditional_inputs(tmp_path):
    model = tiny_clip_vision(hidden=48, projection=40, image_size=28)
    model.save_pretrained(tmp_path / "image_encoder")
    encoder = ImageEncoder.from_pretrained(tmp_path / "image_encoder")
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    pooled = encoder.encode(images, "pooled")
    hidden = encoder.encode(images, "penultimate")
    assert pooled.shape == (2, 40) and hidden.shape == (2, 5, 48)  # 2x2 patches + CLS
    out = model(pixel_values=encoder.preprocess(images), output_hidden_states=True)
    assert torch.allclose(hidden, out.hidden_states[-2]) and torch.allclose(pooled, out.image_embeds)
    assert torch.equal(encoder.unconditional("pooled", 2), torch.zeros(2, 40))  # zeros in embedding space
    zero_pixels = model(pixel_values=torch.zeros(1, 3, 28, 28), output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(encoder.unconditional("penultimate"), zero_pixels)  # the encoder on zero pixels


def test_missing_encoder_folder_and_bad_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image encoder config.json"):
        ImageEncoder.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot read .*broken.png as an image"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ValueError, match="is a folder; expected an image file"):
        load_image(tmp_path)
    tiny_clip_vision().save_pretrained(tmp_path / "encoder")
    weights = tmp_path / "encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    with pytest.raises(ValueError, match="cannot load the image encoder weights in .*encoder: "):
        ImageEncoder.from_pretrained(tmp_path / "encoder")
    Image.new("L", (20000, 20000)).save(tmp_path / "bomb.png")  # a few KB decoding to 400M pixels (PIL's limit: 179M)
    with pytest.raises(ValueError, match="bomb.png is too large to decode safely"):
        load_image(tmp_path / "bomb.png")


def test_16_bit_and_float_images_keep_their_range(tmp_path):
    """PIL's own conversion clips 16-bit values at 255 (a 16-bit ramp turns white) and reads [0, 1] floats as black:
    references, masks and PIL images given in Python are scaled over their range instead."""
    import numpy as np

    from ipadapter.prompter import load_mask

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode.startswith("I")
    loaded = np.asarray(load_image(tmp_path / "ramp16.png"))[..., 0].astype(int)
    assert np.abs(loaded - np.rint(ramp / 65535 * 255)).max() <= 1 and len(np.unique(loaded)) == 256
    floats = Image.fromarray((ramp / 65535).astype(np.float32))  # mode "F" in [0, 1]
    assert np.abs(load_mask(floats).numpy() - ramp / 65535).max() <= 1 / 255


def test_photos_are_read_upright_as_shown(tmp_path):
    """A phone's portrait photo is stored sideways with an EXIF orientation: references, masks and training images
    are read as it is shown (diffusers' load_image does so; the official trainer does not), the same as diffusers."""
    import numpy as np
    from diffusers.utils import load_image as diffusers_load_image

    from ipadapter.training.data import Record, open_image

    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:, :10] = 255  # the left third white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to show"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = diffusers_load_image(str(tmp_path / "photo.jpg"))
    assert shown.size == (20, 30)
    for ours in (load_image(tmp_path / "photo.jpg"), open_image(Record(key="photo.jpg", text="", image_path=str(tmp_path / "photo.jpg")))):
        assert ours.size == (20, 30) and np.array_equal(np.asarray(ours), np.asarray(shown))


def test_encoder_width_is_checked_against_the_adapter():
    encoder = ImageEncoder(tiny_clip_vision(hidden=48, projection=40, image_size=28))
    plus = AdapterConfig("resampler", 16, 32, (32,), image_feature="penultimate", image_embed_dim=64,
                         resampler=ResamplerConfig(dim=32, heads=1))
    with pytest.raises(ValueError, match=r"expects 64-d penultimate features.*the encoder gives 48-d"):
        check_encoder(plus, encoder)
    base = AdapterConfig("linear", 4, 32, (32,), image_feature="pooled", image_embed_dim=40)
    check_encoder(base, encoder)  # matches: no error


def test_repo_and_subfolder_shorthand(tmp_path):
    tiny_clip_vision(image_size=28).save_pretrained(tmp_path / "models" / "image_encoder")
    encoder = ImageEncoder.from_pretrained(f"{tmp_path}::models/image_encoder")  # like h94/IP-Adapter::models/...
    assert encoder.pooled_dim == 40


def test_a_folder_of_another_model_is_named_not_a_validation_trace(tmp_path):
    from tiny_models import tiny_unet

    from ipadapter import IPAdapter, ImageEncoder
    from ipadapter.encoders import check_encoder_folder

    tiny_unet("sd15").save_pretrained(tmp_path / "unet")
    config = IPAdapter.for_unet(tiny_unet("sd15"), "base", image_embed_dim=40).config
    for call in (lambda: check_encoder_folder(config, tmp_path / "unet"), lambda: ImageEncoder.from_pretrained(tmp_path / "unet")):
        with pytest.raises(ValueError, match=r"unet holds a diffusers UNet2DConditionModel \(its config\.json\); expected "
                                             r"a CLIP vision encoder"):  # fmt: skip
            call()


def test_a_raw_clip_vision_model_is_refused_for_pooled_adapters():
    from tiny_models import tiny_clip_vision, tiny_unet
    from transformers import CLIPVisionModel

    from ipadapter import IPAdapter, check_encoder

    vision = CLIPVisionModel(tiny_clip_vision(projection=40).config)
    config = IPAdapter.for_unet(tiny_unet("sd15"), "base", image_embed_dim=40).config
    with pytest.raises(ValueError, match="has no trained projection"):
        check_encoder(config, vision)


def test_a_missing_local_encoder_folder_is_named(tmp_path):
    """A path that does not exist was passed on to the hub and came back as "Repo id must be in the form ..."."""
    from ipadapter import ImageEncoder

    for name in (tmp_path / "no_such_encoder", "./no_such_encoder", f"{tmp_path}/no_such::models/image_encoder"):
        with pytest.raises(FileNotFoundError, match=r"image encoder not found: .*no_such.* \(expected a local model "
                                                    r"folder, or a hub id owner/name\)"):  # fmt: skip
            ImageEncoder.from_pretrained(name)
