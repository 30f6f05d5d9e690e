"""`ipadapter generate`: the same pixels as diffusers for the same seed, parameters in the PNG, early clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_sd_folder

from ipadapter import IPAdapter
from ipadapter.cli import main
from ipadapter.generate import read_parameters


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base, encoder = make_sd_folder(root)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "base", image_embed_dim=40)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save(root / "ip-adapter.safetensors", layout="official")
    Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 20).convert("RGB").save(root / "ref.png")
    return root, base, encoder


def test_seed_gives_the_pixels_diffusers_gives(setup, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root, base, encoder = setup
    args = ["generate", "--image", str(root / "ref.png"), "--prompt", "a red shape", "--scale", "0.7", "--steps", "3",
            "--seed", "5", "--num-images", "2", "--base", base, "--adapter", str(root / "ip-adapter.safetensors"),
            "--image-encoder", encoder, "--out", str(tmp_path)]
    assert main(args) == 0
    ours = [np.asarray(Image.open(tmp_path / f"000005-00{i}.png")) for i in range(2)]
    pipe = StableDiffusionPipeline.from_pretrained(
        base, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
    )
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    theirs = pipe(prompt="a red shape", ip_adapter_image=Image.open(root / "ref.png"), num_inference_steps=3,
                  num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(5)).images
    for a, b in zip(ours, theirs):
        assert np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 1
    params = read_parameters(tmp_path / "000005-000.png")
    assert params["seed"] == 5 and params["scale"] == 0.7 and params["negative_prompt"] == ""
    assert params["guidance"] == 7.5  # the pipeline's default, recorded as used
    # another size: the same pixels as diffusers' height / width
    sized = args[: args.index("--num-images")] + [*args[args.index("--base"):-1], str(tmp_path / "sized"),
                                                  "--width", "24", "--height", "32"]  # fmt: skip
    assert main(sized) == 0
    ours = np.asarray(Image.open(tmp_path / "sized" / "000005-000.png"))
    theirs = pipe(prompt="a red shape", ip_adapter_image=Image.open(root / "ref.png"), num_inference_steps=3, width=24,
                  height=32, generator=torch.Generator("cpu").manual_seed(5)).images[0]  # fmt: skip
    assert ours.shape == (32, 24, 3)
    assert np.abs(ours.astype(int) - np.asarray(theirs).astype(int)).max() <= 1
    assert read_parameters(tmp_path / "sized" / "000005-000.png")["width"] == 24
    with Image.open(tmp_path / "sized" / "000005-000.png") as png:  # the A1111-style line, as image viewers read it
        assert png.text["parameters"].splitlines()[2].startswith(
            f"Steps: 3, Sampler: {type(pipe.scheduler).__name__}, CFG scale: 7.5, Seed: 5, Size: 24x32, Model: {base}, ")


def test_half_precision_gives_the_pixels_diffusers_gives_in_half_precision(setup, tmp_path, monkeypatch):
    """`--dtype float16` (what GPU users run) against diffusers' pipeline loaded with torch_dtype=float16."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ipadapter.prompter import ImagePrompter

    root, base, encoder = setup
    used = {}
    call = ImagePrompter.__call__

    def spy(self, *args, **kwargs):
        used.update(unet=self.pipe.unet.dtype, encoder=self.encoder.dtype,
                    adapter={p.dtype for p in self.adapter.parameters()})  # fmt: skip
        return call(self, *args, **kwargs)

    monkeypatch.setattr(ImagePrompter, "__call__", spy)
    assert main(["generate", "--image", str(root / "ref.png"), "--prompt", "a red shape", "--scale", "0.7", "--steps",
                 "3", "--seed", "5", "--base", base, "--adapter", str(root / "ip-adapter.safetensors"),
                 "--image-encoder", encoder, "--dtype", "float16", "--out", str(tmp_path)]) == 0  # fmt: skip
    ours = np.asarray(Image.open(tmp_path / "000005-000.png")).astype(int)
    assert read_parameters(tmp_path / "000005-000.png")["dtype"] == "float16"
    pipe = StableDiffusionPipeline.from_pretrained(
        base, torch_dtype=torch.float16,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder, torch_dtype=torch.float16),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
    )  # fmt: skip
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    kwargs = dict(prompt="a red shape", ip_adapter_image=Image.open(root / "ref.png"), num_inference_steps=3)
    theirs = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.abs(ours - np.asarray(theirs).astype(int)).max() <= 1
    assert used == {"unet": torch.float16, "encoder": torch.float16, "adapter": {torch.float16}}


def test_bad_inputs_fail_before_any_model_work(setup, tmp_path, capsys):
    root, base, encoder = setup
    (tmp_path / "broken.png").write_bytes(b"nope")
    ref = str(root / "ref.png")
    faces = tmp_path / "faces.npy"
    np.save(faces, np.zeros((1, 512), np.float32))
    ok = ["--image", ref, "--adapter", str(root / "ip-adapter.safetensors")]  # valid so far; each case adds one fault
    cases = [
        (["--image", str(tmp_path / "missing.png")], "image not found"),
        (["--image", str(tmp_path / "broken.png")], "cannot read .*broken.png as an image"),
        (["--image", ref, "--adapter", str(tmp_path / "none.bin")], "adapter not found"),
        ([*ok, "--init-image", ref, "--strength", "2"], r"--strength must be in \(0, 1\], found 2.0"),
        ([*ok, "--num-images", "0"], r"^error: --num-images must be >= 1, found 0$"),
        ([*ok, "--steps", "0"], r"^error: --steps must be >= 1, found 0$"),
        ([*ok, "--negative-image", ref, "--negative-noise", "0.3"], r"--negative-image and --negative-noise both choose"),
        ([*ok, "--scale", "nan"], r"--scale must be a finite number, found nan"),
        ([*ok, "--width", "30"], r"--width must be a positive multiple of 8 .*, found 30"),
        ([*ok, "--init-image", ref, "--height", "16"], r"--width / --height do not apply with --init-image"),
        ([*ok, "--out", ref], r"--out .*ref.png is a file; expected a folder"),
        ([*ok, "--dtype", "int8"], r"unknown dtype 'int8'; expected one of float32, float16, bfloat16"),
        ([*ok, "--image-mask", ref, ref], r"expected one --image-mask, or one per --image \(1\), found 2"),
        ([*ok, "--s-scale", "0.5"], r"--s-scale weighs the face-structure branch of FaceID-PlusV2 adapters; .*\(base\) has none"),
        ([*ok, "--face-id", str(faces)], r"--face-id / --face-image need a FaceID adapter; .*\(base\) is not one"),
        ([*ok, "--pag-scale", "-1"], r"--pag-scale must be >= 0 \(0: off\), found -1.0"),
        ([*ok, "--guidance", "-1"], r"--guidance must be >= 0 \(up to 1: no classifier-free guidance\), found -1.0"),
        ([*ok, "--image-encoder", "./models/encoder"], r"--image-encoder ./models/encoder: not found \(expected a local"),
        ([*ok, "--controlnet", "/no/such/controlnet", "--control-image", ref], r"--controlnet /no/such/controlnet: not found"),
        (["--image", ref, ref, "--negative-image", ref, ref, ref, "--adapter", str(root / "ip-adapter.safetensors")],
         r"expected one --negative-image, or one per --image \(2\), found 3"),
        (["--image", ref, ref, "--prep", "tiles", "--negative-image", ref, ref, ref, "--adapter",
          str(root / "ip-adapter.safetensors")], r"expected one --negative-image, or one per --image \(2\), found 3"),
        ([*ok, "--pag-layers", "mid"], r"--pag-layers .* acts only with --pag-scale > 0"),
        ([*ok, "--pag-scale", "2", "--pag-layers", "down("], r"--pag-layers 'down\(' is not a valid pattern"),
    ]
    import re

    for extra, message in cases:
        assert main(["generate", *extra, "--base", str(tmp_path / "no-model")]) == 2
        assert re.search(message, capsys.readouterr().err, re.M)


def test_perturbed_attention_guidance_gives_diffusers_pag_pixels(setup, tmp_path, capsys):
    from diffusers import StableDiffusionPAGPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root, base, encoder = setup
    ref = str(root / "ref.png")
    common = ["--image", ref, "--base", base, "--adapter", str(root / "ip-adapter.safetensors"), "--image-encoder",
              encoder, "--steps", "3", "--seed", "2", "--scale", "0.8", "--prompt", "a red shape"]  # fmt: skip
    assert main(["generate", *common, "--out", str(tmp_path / "plain")]) == 0
    assert main(["generate", *common, "--pag-scale", "2.5", "--pag-layers", "down", "up_blocks.1",
                 "--out", str(tmp_path / "pag")]) == 0  # fmt: skip
    ours = np.asarray(Image.open(tmp_path / "pag" / "000002-000.png")).astype(int)
    plain = np.asarray(Image.open(tmp_path / "plain" / "000002-000.png")).astype(int)
    pipe = StableDiffusionPAGPipeline.from_pretrained(
        base, image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder), pag_applied_layers=["down", "up_blocks.1"],
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
    )  # fmt: skip
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.8)
    theirs = pipe(prompt="a red shape", ip_adapter_image=Image.open(ref), num_inference_steps=3, pag_scale=2.5,
                  generator=torch.Generator("cpu").manual_seed(2)).images[0]  # fmt: skip
    assert np.abs(ours - plain).max() > 3  # the perturbed layers change the image
    assert np.abs(ours - np.asarray(theirs).astype(int)).max() <= 1
    params = read_parameters(tmp_path / "pag" / "000002-000.png")
    assert params["pag_scale"] == 2.5 and params["pag_layers"] == ["down", "up_blocks.1"]
    # a layer pattern that names nothing, before the first step; a kind of generation diffusers has no PAG pipeline for
    assert main(["generate", *common, "--pag-scale", "2", "--pag-layers", "nowhere", "--out", str(tmp_path)]) == 2
    assert "--pag-layers 'nowhere' names no self-attention layer of this UNet" in capsys.readouterr().err
    (tmp_path / "controlnet").mkdir()
    (tmp_path / "controlnet" / "config.json").write_text("{}")
    assert main(["generate", *common, "--pag-scale", "2", "--controlnet", str(tmp_path / "controlnet"),
                 "--control-image", ref, "--init-image", ref, "--out", str(tmp_path)]) == 2  # fmt: skip
    assert ("diffusers has no perturbed-attention guidance pipeline for image2image with this base and a ControlNet "
            "(stable-diffusion-controlnet-pag)") in capsys.readouterr().err  # fmt: skip
    assert not list(tmp_path.glob("*.png"))


def test_controlnet_sees_text_only_and_gives_diffusers_pixels(setup, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    root, base, encoder = setup
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
                                           conditioning_embedding_out_channels=(8, 16))  # 16 px -> 8x8 latents
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero convolutions would make the ControlNet a no-op
    controlnet.save_pretrained(tmp_path / "controlnet")
    control = np.zeros((16, 16, 3), np.uint8)
    control[4:12, 2:8] = 255
    Image.fromarray(control).save(tmp_path / "control.png")
    args = ["generate", "--image", str(root / "ref.png"), "--prompt", "a red shape", "--scale", "0.6", "--steps", "3",
            "--seed", "2", "--base", base, "--adapter", str(root / "ip-adapter.safetensors"), "--image-encoder", encoder,
            "--controlnet", str(tmp_path / "controlnet"), "--control-image", str(tmp_path / "control.png"),
            "--controlnet-scale", "0.8", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=ControlNetModel.from_pretrained(tmp_path / "controlnet"),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
    )
    pipe.load_ip_adapter(str(root), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.6)
    theirs = pipe(prompt="a red shape", image=Image.open(tmp_path / "control.png"),
                  ip_adapter_image=Image.open(root / "ref.png"), num_inference_steps=3, controlnet_conditioning_scale=0.8,
                  generator=torch.Generator("cpu").manual_seed(2)).images[0]  # fmt: skip
    ours = np.asarray(Image.open(tmp_path / "out" / "000002-000.png")).astype(int)
    assert np.abs(ours - np.asarray(theirs).astype(int)).max() <= 1
    assert read_parameters(tmp_path / "out" / "000002-000.png")["controlnet"] == str(tmp_path / "controlnet")
    # image-to-image with an init image of another size than the condition: both at the init image's size
    Image.effect_mandelbrot((24, 24), (-2, -1.2, 1, 1.2), 20).convert("RGB").save(tmp_path / "init.png")
    assert main([*args[:-1], str(tmp_path / "img2img"), "--init-image", str(tmp_path / "init.png")]) == 0
    assert Image.open(tmp_path / "img2img" / "000002-000.png").size == (24, 24)
    # ControlNet inpainting keeps --width / --height, as inpainting without one does (they were replaced by the init
    # image's size, and the PNG said otherwise)
    Image.fromarray(control[..., 0]).save(tmp_path / "inpaint.png")
    assert main([*args[:-1], str(tmp_path / "inpaint"), "--init-image", str(tmp_path / "init.png"), "--inpaint-mask",
                 str(tmp_path / "inpaint.png"), "--width", "16", "--height", "32"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "inpaint" / "000002-000.png").size == (16, 32)


def test_t2i_adapter_beside_the_image_prompt(setup, tmp_path, capsys):
    """--t2i-adapter: diffusers' T2I-Adapter pipeline of the base (its SD1.5 one has no built-in IP-Adapter, so the
    image prompt is checked against the Python API on that pipeline, and scale 0 against diffusers' own pixels)."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    from ipadapter import ImageEncoder
    from ipadapter.prompter import ImagePrompter

    root, base, encoder = setup
    torch.manual_seed(0)
    T2IAdapter(in_channels=3, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=2,
               adapter_type="full_adapter").save_pretrained(tmp_path / "t2i")  # fmt: skip
    control = np.zeros((16, 16, 3), np.uint8)
    control[4:12, 2:8] = 255
    Image.fromarray(control).save(tmp_path / "control.png")
    ref = str(root / "ref.png")
    args = ["generate", "--image", ref, "--prompt", "a red shape", "--steps", "3", "--seed", "2", "--base", base,
            "--adapter", str(root / "ip-adapter.safetensors"), "--image-encoder", encoder, "--t2i-adapter",
            str(tmp_path / "t2i"), "--control-image", str(tmp_path / "control.png"), "--t2i-adapter-scale", "0.9"]
    outs = {}
    for scale in ("0.7", "0"):
        assert main([*args, "--scale", scale, "--out", str(tmp_path / scale)]) == 0
        outs[scale] = np.asarray(Image.open(tmp_path / scale / "000002-000.png")).astype(int)
    pipe = StableDiffusionAdapterPipeline.from_pretrained(base, adapter=T2IAdapter.from_pretrained(tmp_path / "t2i"))
    call = {"prompt": "a red shape", "num_inference_steps": 3, "adapter_conditioning_scale": 0.9}
    plain = pipe(image=Image.open(tmp_path / "control.png"), generator=torch.Generator("cpu").manual_seed(2), **call)
    assert np.abs(outs["0"] - np.asarray(plain.images[0]).astype(int)).max() <= 1  # diffusers' pixels
    prompter = ImagePrompter(pipe, IPAdapter.from_file(root / "ip-adapter.safetensors"), ImageEncoder.from_pretrained(encoder))
    try:
        api = prompter(image=Image.open(ref), scale=0.7, pipeline_image=Image.open(tmp_path / "control.png"),
                       generator=torch.Generator("cpu").manual_seed(2), **call).images[0]  # fmt: skip
    finally:
        prompter.detach()
    assert np.abs(outs["0.7"] - np.asarray(api).astype(int)).max() <= 1 and np.abs(outs["0.7"] - outs["0"]).max() > 3
    assert read_parameters(tmp_path / "0.7" / "000002-000.png")["t2i_adapter_scale"] == 0.9
    import re

    (tmp_path / "not-t2i").mkdir()
    (tmp_path / "not-t2i" / "config.json").write_text('{"_class_name": "ControlNetModel"}')
    T2IAdapter(in_channels=3, channels=[16, 32, 32, 32], num_res_blocks=1, downscale_factor=2,
               adapter_type="full_adapter").save_pretrained(tmp_path / "t2i-other")  # for a narrower UNet
    no_control = args[: args.index("--control-image")] + ["--out", str(tmp_path)]
    for extra, message in (([], r"--controlnet / --t2i-adapter and --control-image go together"),
                           (["--control-image", ref, "--init-image", ref], r"--t2i-adapter generates from text"),
                           (["--control-image", ref, "--controlnet", str(tmp_path / "t2i")], "not both"),
                           (["--control-image", ref, "--t2i-adapter", str(tmp_path / "not-t2i")],
                            r"not-t2i is not a diffusers T2I-Adapter folder: .* found ControlNetModel"),
                           (["--control-image", ref, "--t2i-adapter", str(tmp_path / "t2i-other")],
                            r"the T2I-Adapter .*t2i-other does not fit the base's UNet: its feature maps have 16 "
                            r"channels at 1/\d+, 32 channels .* the UNet's down blocks have \[32, 64")):  # fmt: skip
        assert main([*no_control, *extra]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert main(["generate", "--image", ref, "--t2i-adapter-scale", "0.5", "--out", str(tmp_path)]) == 2
    assert "--t2i-adapter-scale acts only with --t2i-adapter" in capsys.readouterr().err
    # a one-channel adapter (canny, sketch) reads the condition as greyscale (it crashed at the first step)
    T2IAdapter(in_channels=1, channels=[32, 64, 64, 64], num_res_blocks=1, downscale_factor=2,
               adapter_type="full_adapter").save_pretrained(tmp_path / "t2i-edges")  # fmt: skip
    edges = [*args[: args.index("--t2i-adapter") + 1], str(tmp_path / "t2i-edges"), *args[args.index("--t2i-adapter") + 2:]]
    assert main([*edges, "--out", str(tmp_path / "edges")]) == 0


def test_saved_embeddings_reproduce_the_images_and_controls_reach_the_pixels(setup, tmp_path):
    root, base, encoder = setup
    Image.linear_gradient("L").resize((32, 32)).convert("RGB").save(tmp_path / "ref2.png")
    common = ["--steps", "3", "--seed", "1", "--base", base, "--adapter", str(root / "ip-adapter.safetensors"),
              "--image-encoder", encoder]  # fmt: skip
    refs = ["--image", str(root / "ref.png"), str(tmp_path / "ref2.png"), "--combine", "average", "--weights", "0.3", "0.7"]
    assert main(["generate", *refs, *common, "--save-embeds", str(tmp_path / "e.safetensors"), "--out", str(tmp_path / "a")]) == 0
    assert main(["generate", "--embeds", str(tmp_path / "e.safetensors"), "--combine", "average", "--weights", "0.3",
                 "0.7", *common, "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    a = np.asarray(Image.open(tmp_path / "a" / "000001-000.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b" / "000001-000.png")).astype(int)
    assert np.abs(a - b).max() <= 1
    mask = np.zeros((16, 16), np.uint8)
    Image.fromarray(mask).save(tmp_path / "black.png")
    assert main(["generate", *refs, *common, "--mask", str(tmp_path / "black.png"), "--out", str(tmp_path / "m")]) == 0
    assert main(["generate", *refs, *common, "--scale", "0", "--out", str(tmp_path / "z")]) == 0
    masked = np.asarray(Image.open(tmp_path / "m" / "000001-000.png")).astype(int)
    no_adapter = np.asarray(Image.open(tmp_path / "z" / "000001-000.png")).astype(int)
    assert np.abs(masked - no_adapter).max() <= 1 and np.abs(masked - a).max() > 2  # a black mask = no adapter
    assert main(["generate", *refs, *common, "--preset", "style", "--out", str(tmp_path / "s")]) == 0
    params = read_parameters(tmp_path / "s" / "000001-000.png")
    assert params["preset"] == "style" and params["weights"] == [0.3, 0.7] and params["combine"] == "average"


def test_saved_embeddings_need_no_image_encoder_and_the_png_reruns(setup, tmp_path, capsys):
    """A Plus adapter's embeddings file holds the encoder's view of the empty image too, so generating from it needs
    no encoder (that failed after every model had loaded); the PNG's parameters run again (they named the embeddings
    file as an output to write, which is refused once it exists)."""
    import shutil

    from diffusers import UNet2DConditionModel

    from ipadapter import ImageEncoder
    from ipadapter.embeds import load_embeds, save_embeds
    from ipadapter.generate import GenerateConfig, generate

    root, base, encoder = setup
    torch.manual_seed(1)
    plus = IPAdapter.for_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "plus",
                              image_embed_dim=ImageEncoder.from_pretrained(encoder).feature_dim("penultimate"))  # fmt: skip
    with torch.no_grad():
        for p in plus.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plus.save(tmp_path / "plus.safetensors")
    alone = shutil.copytree(base, tmp_path / "elsewhere" / "sd")  # no image_encoder/ inside or beside it
    common = ["--steps", "2", "--seed", "3", "--adapter", str(tmp_path / "plus.safetensors"), "--prompt", "a shape"]
    embeds = tmp_path / "e.safetensors"
    assert main(["generate", "--image", str(root / "ref.png"), *common, "--base", base, "--image-encoder", encoder,
                 "--save-embeds", str(embeds), "--out", str(tmp_path / "a")]) == 0  # fmt: skip
    assert main(["generate", "--embeds", str(embeds), *common, "--base", str(alone), "--out", str(tmp_path / "b")]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "000003-000.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b" / "000003-000.png")).astype(int)
    assert np.abs(a - b).max() <= 1
    again = generate(GenerateConfig(**read_parameters(tmp_path / "a" / "000003-000.png"), show_progress=False))
    assert np.abs(np.asarray(Image.open(again[0])).astype(int) - a).max() <= 1
    assert main(["generate", "--embeds", str(embeds), *common, "--base", str(alone), "--negative-image",
                 str(root / "ref.png")]) == 2  # an image to encode, and no encoder: said before any model loads
    assert "--negative-image is encoded by" in capsys.readouterr().err
    features, meta = load_embeds(embeds)
    save_embeds(tmp_path / "old.safetensors", features, meta["feature"])  # as written before: no unconditional
    assert main(["generate", "--embeds", str(tmp_path / "old.safetensors"), *common, "--base", str(alone)]) == 2
    assert "holds no unconditional features (written by an older ipadapter), which" in capsys.readouterr().err
    # without guidance no unconditional branch runs: nothing is missing
    assert main(["generate", "--embeds", str(tmp_path / "old.safetensors"), *common, "--base", str(alone),
                 "--guidance", "1", "--out", str(tmp_path / "unguided")]) == 0  # fmt: skip


def test_image_mask_alpha_is_each_references_transparency(setup, tmp_path, capsys):
    """A cut-out subject on a transparent background: `--image-mask alpha` equals passing its alpha as the mask."""
    root, base, encoder = setup
    rgba = Image.open(root / "ref.png").convert("RGBA")
    alpha = np.zeros((30, 40), np.uint8)
    alpha[5:25, 10:30] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(tmp_path / "cutout.png")
    Image.fromarray(alpha).save(tmp_path / "alpha.png")
    common = ["generate", "--image", str(tmp_path / "cutout.png"), "--steps", "2", "--base", base, "--adapter",
              str(root / "ip-adapter.safetensors"), "--image-encoder", encoder]  # fmt: skip
    outs = {}
    for name, mask in (("alpha", "alpha"), ("file", str(tmp_path / "alpha.png")), ("none", None)):
        assert main([*common, *(["--image-mask", mask] if mask else []), "--out", str(tmp_path / name)]) == 0
        outs[name] = np.asarray(Image.open(tmp_path / name / "000000-000.png")).astype(int)
    assert np.array_equal(outs["alpha"], outs["file"]) and not np.array_equal(outs["alpha"], outs["none"])
    capsys.readouterr()
    assert main([*common[:2], str(root / "ref.png"), *common[3:], "--image-mask", "alpha"]) == 2
    assert "ref.png has no alpha channel (mode RGB)" in capsys.readouterr().err


def test_bad_control_inputs_are_named(setup, tmp_path, capsys, monkeypatch):
    import re
    import sys

    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.setitem(sys.modules, "insightface.app", None)

    root, base, _ = setup
    ref = ["--image", str(root / "ref.png"), "--adapter", str(root / "ip-adapter.safetensors")]
    from diffusers import UNet2DConditionModel

    faceid = tmp_path / "ip-adapter-faceid.safetensors"
    IPAdapter.for_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "faceid").save(faceid)
    cases = [
        ([*ref, "--preset", "stlye"], "unknown --preset 'stlye'; expected one of linear"),
        ([*ref, "--controlnet", str(tmp_path)], "--controlnet / --t2i-adapter and --control-image go together"),
        ([*ref, "--mask", str(tmp_path / "nomask.png")], "image not found: .*nomask.png"),
        ([*ref, "--weights", "1", "2"], r"one --weights value per reference image \(1\), found 2"),
        ([*ref, "--face-id", str(tmp_path / "face.npy")], "not found: .*face.npy"),
        (["--image", ref[1], ref[1], *ref[2:], "--combine", "mean"], "unknown --combine 'mean'"),
        (["--face-image", str(root / "ref.png"), "--adapter", str(faceid), "--insightface-root", str(tmp_path)],
         "insightface"),  # not installed here, or no model pack: named
    ]
    for extra, message in cases:
        assert main(["generate", *extra, "--base", str(tmp_path / "no-model")]) == 2
        assert re.search(message, capsys.readouterr().err, re.M), message


def test_single_file_base_gives_the_folders_pixels(setup, tmp_path):
    """A community model shared as one original-layout .safetensors file, loaded offline with its configs."""
    from ldm_format import save_ldm_checkpoint

    root, base, encoder = setup
    single = save_ldm_checkpoint(base, tmp_path / "model.safetensors")
    common = ["generate", "--image", str(root / "ref.png"), "--steps", "3", "--seed", "4",
              "--adapter", str(root / "ip-adapter.safetensors"), "--image-encoder", encoder]  # fmt: skip
    assert main([*common, "--base", base, "--out", str(tmp_path / "folder")]) == 0
    assert main([*common, "--base", str(single), "--base-config", base, "--out", str(tmp_path / "file")]) == 0
    a = np.asarray(Image.open(tmp_path / "folder" / "000004-000.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "file" / "000004-000.png")).astype(int)
    assert np.abs(a - b).max() <= 1
    pag = ["--pag-scale", "2", "--pag-layers", "down"]  # the PAG pipeline made from the single file's pipeline
    assert main([*common, *pag, "--base", base, "--out", str(tmp_path / "folder-pag")]) == 0
    assert main([*common, *pag, "--base", str(single), "--base-config", base, "--out", str(tmp_path / "file-pag")]) == 0
    c = np.asarray(Image.open(tmp_path / "folder-pag" / "000004-000.png")).astype(int)
    d = np.asarray(Image.open(tmp_path / "file-pag" / "000004-000.png")).astype(int)
    assert np.abs(c - d).max() <= 1 and np.abs(a - c).max() > 3


def test_a_single_files_family_comes_from_its_tensors_or_its_config_not_its_name(tmp_path, monkeypatch):
    """SDXL fine-tunes are often named without "xl" (e.g. Juggernaut_X_RunDiffusion.safetensors): the pipeline class
    comes from the checkpoint's own text-encoder keys, or from --base-config's pipeline class; the hint for a missing
    config names a base of the file's family."""
    import json

    from safetensors.torch import save_file

    from ipadapter.sources import load_pipeline, single_file_is_sdxl

    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}
    sdxl, sd15 = tmp_path / "Juggernaut_X_RunDiffusion.safetensors", tmp_path / "dreamshaper_xl_lookalike.safetensors"
    save_file({**unet, "conditioner.embedders.1.model.ln_final.weight": torch.zeros(8)}, str(sdxl))
    save_file({**unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}, str(sd15))
    assert single_file_is_sdxl(sdxl) and not single_file_is_sdxl(sd15)
    (tmp_path / "xl-config").mkdir()
    (tmp_path / "xl-config" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert single_file_is_sdxl(sd15, str(tmp_path / "xl-config"))  # the user's --base-config decides
    assert single_file_is_sdxl(tmp_path / "sd_xl_base_1.0.ckpt") and not single_file_is_sdxl(tmp_path / "v1-5.ckpt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"pass --base-config .*\(e.g. stabilityai/stable-diffusion-xl-base-1.0\)"):
        load_pipeline(str(sdxl))


def test_a_base_that_is_not_a_model_is_named_before_any_model_work(setup, tmp_path, capsys, monkeypatch):
    from ldm_format import save_ldm_checkpoint

    import ipadapter.sources

    root, base, encoder = setup
    common = ["generate", "--image", str(root / "ref.png"), "--adapter", str(root / "ip-adapter.safetensors"),
              "--out", str(tmp_path / "out")]  # fmt: skip
    cases = [(str(root / "ip-adapter.safetensors"), r"is not a single-file Stable Diffusion checkpoint: expected "
                                                   r"model.diffusion_model.\* tensors .* such as \['image_proj"),
             (str(root / "ref.png"), r"is neither a diffusers pipeline folder nor a single-file checkpoint"),
             (str(tmp_path), r"is not a diffusers pipeline folder: model_index.json missing"),
             (str(tmp_path / "text.ckpt"), r"text.ckpt is not a readable .ckpt checkpoint .* starting with b'not '"),
             (str(tmp_path / "gone" / "model"), r"base model not found: .*gone/model \(expected a diffusers folder"),
             (str(tmp_path / "half"), r"half is missing its unet: expected .*half/unet/config.json")]  # fmt: skip
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    (tmp_path / "half").mkdir()  # a download cut short
    (tmp_path / "half" / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    monkeypatch.setattr(ipadapter.sources, "load_pipeline", None)  # any model work would fail differently
    import re

    for bad, message in cases:
        assert main([*common, "--base", bad]) == 2
        assert re.search(message, capsys.readouterr().err)
    # owner/name: a hub id, or a relative folder that is not there (offline, not cached): both named
    monkeypatch.chdir(tmp_path)
    assert main([*common, "--base", "models/sd15"]) == 2
    assert "pass --image-encoder (the base models/sd15 is not a local folder: no image_encoder/ is looked for beside " \
           "a hub id, and a folder of that name does not exist here)" in capsys.readouterr().err  # fmt: skip
    monkeypatch.undo()
    # a real single file without --base-config, offline: diffusers cannot fetch its configs; the error says what to pass
    single = save_ldm_checkpoint(base, tmp_path / "model.safetensors")
    assert main([*common, "--base", str(single), "--image-encoder", encoder]) == 2
    assert "pass --base-config with the diffusers folder or hub id it follows" in capsys.readouterr().err


def test_face_image_gives_faceid_plus_its_aligned_face_crop(setup, tmp_path, monkeypatch):
    """`--face-image` alone drives a FaceID-Plus adapter: the ArcFace embedding and the aligned face crop (through the
    image encoder), as the official pipeline computes them; the same pixels as passing both by hand. insightface is
    not installed here: a stand-in with its interface (largest face, five landmarks, norm_crop) replaces it."""
    import sys
    import types

    from diffusers import UNet2DConditionModel

    from ipadapter import ImageEncoder

    root, base, encoder = setup
    crops = []

    class Face:
        def __init__(self, x):
            self.bbox = np.array([x, 0, x + 8, 8 + x])  # the larger x, the larger the face
            self.kps = np.full((5, 2), float(x))
            self.normed_embedding = np.linspace(-1, 1, 512, dtype=np.float32) * (x + 1)

    class FaceAnalysis:
        def __init__(self, name, root, providers):
            pass

        def prepare(self, ctx_id, det_size):
            pass

        def get(self, bgr):
            return [Face(2), Face(6)]

    def norm_crop(bgr, landmark, image_size):
        crops.append(float(landmark[0, 0]))
        return np.ascontiguousarray(np.resize(bgr, (image_size, image_size, 3)))

    fake = {"insightface": types.ModuleType("insightface"), "insightface.app": types.ModuleType("insightface.app"),
            "insightface.utils": types.ModuleType("insightface.utils"),
            "insightface.utils.face_align": types.ModuleType("insightface.utils.face_align")}  # fmt: skip
    fake["insightface.app"].FaceAnalysis = FaceAnalysis
    fake["insightface.utils.face_align"].norm_crop = norm_crop
    fake["insightface.utils"].face_align = fake["insightface.utils.face_align"]
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    (tmp_path / "models" / "buffalo_l" / "det.onnx").write_bytes(b"")

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    torch.manual_seed(0)
    adapter = IPAdapter.for_unet(unet, "faceid_plusv2", image_embed_dim=ImageEncoder.from_pretrained(encoder).hidden_dim)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save(tmp_path / "faceid-plusv2.safetensors")
    common = ["generate", "--steps", "2", "--base", base, "--adapter", str(tmp_path / "faceid-plusv2.safetensors"),
              "--image-encoder", encoder]  # fmt: skip
    assert main([*common, "--face-image", str(root / "ref.png"), "--insightface-root", str(tmp_path),
                 "--out", str(tmp_path / "auto")]) == 0  # fmt: skip
    assert crops == [6.0]  # the largest face's landmarks
    from ipadapter.faces import FaceEmbedder

    embedder = FaceEmbedder(root=tmp_path)
    face = Image.open(root / "ref.png").convert("RGB")
    embedder.aligned_crop(face).save(tmp_path / "crop.png")
    np.save(tmp_path / "face.npy", embedder.embed(face).numpy()[None])
    assert main([*common, "--image", str(tmp_path / "crop.png"), "--face-id", str(tmp_path / "face.npy"),
                 "--out", str(tmp_path / "manual")]) == 0  # fmt: skip
    auto, manual = (np.asarray(Image.open(tmp_path / d / "000000-000.png")) for d in ("auto", "manual"))
    assert np.array_equal(auto, manual)


def test_what_does_not_fit_the_models_is_named_before_any_model_loads(setup, tmp_path, capsys, monkeypatch):
    """Adapter against base, encoder and --embeds, the inputs each kind of adapter needs or would ignore, devices,
    steps: all read from the files' headers and configs, so a mistake costs no model load (on SDXL, minutes)."""
    import json
    import re

    from diffusers import UNet2DConditionModel

    import ipadapter.sources
    from ipadapter.embeds import save_embeds
    from ipadapter.sources import TINYWORLD_DIR

    root, base, encoder = setup
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    faceid, plus = tmp_path / "faceid.safetensors", tmp_path / "plus.safetensors"
    IPAdapter.for_unet(unet, "faceid").save(faceid)
    IPAdapter.for_unet(unet, "plus", image_embed_dim=32).save(plus)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_embeds(tmp_path / "wide.safetensors", torch.zeros(1, 64), "pooled")
    np.save(tmp_path / "face.npy", np.zeros((1, 512), np.float32))
    control = tmp_path / "controlnet"
    control.mkdir()
    (control / "config.json").write_text(json.dumps({**unet.config, "_class_name": "ControlNetModel", "block_out_channels": [8, 16]}))
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (1, 30)).save(tmp_path / "tiny.png")
    ref, ip = str(root / "ref.png"), str(root / "ip-adapter.safetensors")
    ok = ["--image", ref, "--adapter", ip, "--image-encoder", encoder]
    cases = [
        (["--image", ref, "--adapter", "tinyworld-base"], r"base.safetensors \(base\) does not fit the base .*: this "
                                                          r"adapter is for custom \(10 cross-attention layers"),
        (["--image", ref, "--adapter", str(tmp_path / "corrupt.safetensors")], "not a readable safetensors file"),
        ([*ok[:4], "--image-encoder", str(TINYWORLD_DIR / "sd" / "image_encoder")],
         "image encoder mismatch: this adapter .* expects 40-d pooled features .* the encoder gives 64-d"),
        (["--embeds", str(tmp_path / "wide.safetensors"), "--adapter", ip], "holds 64-d pooled features .* reads 40-d"),
        (["--image", ref, "--adapter", str(plus), "--content-text", "a cat", "--content-text-encoder", "x"],
         "--content-text .* global image embeddings only; plus.safetensors \\(plus\\) reads penultimate features"),
        ([*ok, "--content-text", "a cat"], r"--content-text needs --content-text-encoder: .*\(e.g. laion/CLIP-ViT-H"),
        ([*ok, "--composition-image", ref], "--composition-image needs --preset style_and_composition"),
        (["--image", ref, "--face-id", str(tmp_path / "face.npy"), "--adapter", str(faceid)],
         r"faceid.safetensors \(faceid\) reads face embeddings only, no image: --image would be ignored"),
        (["--face-image", ref, "--adapter", str(plus)], "need a FaceID adapter"),
        (["--face-id", str(tmp_path / "face.npy"), "--adapter", ip], "need a FaceID adapter"),
        ([*ok, "--save-embeds", str(tmp_path / "folder")], "--save-embeds .*folder is a folder; expected a .safetensors"),
        ([*ok, "--save-embeds", ip], r"--save-embeds .*ip-adapter.safetensors exists; it is not replaced"),  # the adapter
        ([*ok, "--save-embeds", ref], r"--save-embeds writes safetensors; expected a name ending in .safetensors"),
        ([*ok, "--save-embeds", str(tmp_path / "e.pt")], r"expected a name ending in .safetensors, found .*e.pt"),
        ([*ok, "--device", "gpu9"], "unknown --device 'gpu9'"),
        ([*ok, "--seed", str(2**64)], r"--seed must be within \[-2\*\*63, 2\*\*64\), found 18446744073709551616"),
        ([*ok, "--init-image", ref, "--steps", "4", "--strength", "0.2"], r"int\(4 x 0.2\) = 0 denoising steps"),
        ([*ok, "--strength", "0.5"], "--strength acts only with --init-image"),
        ([*ok, "--init-image", str(tmp_path / "tiny.png")],  # diffusers: "height and width must be > 0", models loaded
         r"--init-image .*tiny.png is 1x30 px; image-to-image keeps its size, rounded down to multiples of 2 .*: "
         r"expected at least 2 px a side"),  # (this VAE: 2 blocks)
        ([*ok, "--combine", "average"], r"--combine mixes several references .*; one --image was given"),
        ([*ok, "--negative-prompt", "red", "--negative-image", ref, "--negative-noise", "0", "--guidance", "1"],
         r"--negative-prompt, --negative-image act\(s\) only with classifier-free guidance \(--guidance > 1\); found "
         r"--guidance 1"),
        ([*ok, "--boost", "1"], "--boost goes with --preset style_precise / composition_precise"),
        ([*ok, "--controlnet", str(control), "--control-image", ref],
         r"the ControlNet .* is for a UNet with block_out_channels \[8, 16\]; the base's UNet has"),
        ([*ok, "--controlnet", f"{base}/unet", "--control-image", ref],
         r"unet holds a UNet2DConditionModel; expected a ControlNetModel folder"),
        (["--image", ref, "--adapter", str(faceid)], r"faceid.safetensors \(faceid\) is a FaceID adapter: pass --face-id"),
    ]
    monkeypatch.setattr(ipadapter.sources, "load_pipeline", None)  # any model work would fail differently
    for extra, message in cases:
        assert main(["generate", *extra, "--base", base, "--out", str(tmp_path / "out")]) == 2, message
        assert re.search(message, capsys.readouterr().err), message


def test_several_faces_of_one_person_concatenate_their_tokens_and_outputs_are_never_overwritten(setup, tmp_path):
    """FaceID-Portrait's input: K ArcFace embeddings of one person, each projected to its tokens, concatenated (the
    official multi-face path). And a second run into the same folder keeps the first one's images."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ipadapter.prompter import ImagePrompt, ImagePrompter

    root, base, encoder = setup
    torch.manual_seed(3)
    adapter = IPAdapter.for_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"), "faceid")
    adapter.save(tmp_path / "faceid.safetensors")
    faces = torch.randn(3, 512)
    np.save(tmp_path / "faces.npy", faces.numpy())
    prompter = ImagePrompter(StableDiffusionPipeline.from_pretrained(base), adapter)
    try:
        (group,) = prompter.groups(0, ImagePrompt(face_id=faces[None]), n_prompts=1, cfg=True)
    finally:
        prompter.detach()
    with torch.no_grad():
        each = adapter.project(face_id=faces)  # (3, T, C)
    assert torch.equal(group.cond, each.reshape(1, -1, each.shape[-1]))  # (1, 3T, C)
    args = ["generate", "--face-id", str(tmp_path / "faces.npy"), "--adapter", str(tmp_path / "faceid.safetensors"),
            "--steps", "2", "--base", base, "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0 and main([*args, "--prompt", "second"]) == 0
    first, second = tmp_path / "out" / "000000-000.png", tmp_path / "out" / "000000-000-1.png"
    assert read_parameters(first)["prompt"] == "" and read_parameters(second)["prompt"] == "second"


def test_sdxl_content_subtraction_uses_the_bases_own_bigg_text_tower(tmp_path, capsys):
    """InstantStyle on SDXL bigG adapters subtracts the text's embedding from the pipeline's own text_encoder_2 (its
    pooled projection, with tokenizer_2): the default without --content-text-encoder, and the same when that tower
    is named as BASE::text_encoder_2 or BASE/text_encoder_2. A tower of another width is named before generating."""
    from diffusers import UNet2DConditionModel
    from tiny_models import make_sdxl_folder, tiny_clip_vision

    from ipadapter.encoders import TextEmbedder

    base = make_sdxl_folder(tmp_path)
    tiny_clip_vision(image_size=28, projection=32).save_pretrained(tmp_path / "bigg")  # text_encoder_2's width
    tiny_clip_vision(image_size=28, projection=40).save_pretrained(tmp_path / "vith")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    for name, dim in (("bigg", 32), ("vith", 40)):
        torch.manual_seed(3)
        adapter = IPAdapter.for_unet(unet, "base", image_embed_dim=dim)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(0.2 * torch.randn_like(p))
        adapter.save(tmp_path / f"{name}.safetensors")
    Image.radial_gradient("L").convert("RGB").save(tmp_path / "ref.png")
    common = ["generate", "--image", str(tmp_path / "ref.png"), "--base", base, "--steps", "2", "--seed", "1",
              "--width", "16", "--height", "16", "--adapter", str(tmp_path / "bigg.safetensors"),
              "--image-encoder", str(tmp_path / "bigg")]  # fmt: skip
    runs = {"plain": [], "default": ["--content-text", "a cat", "--content-scale", "2"],
            "named": ["--content-text", "a cat", "--content-scale", "2", "--content-text-encoder", f"{base}::text_encoder_2"],
            "folder": ["--content-text", "a cat", "--content-scale", "2", "--content-text-encoder", f"{base}/text_encoder_2"]}  # fmt: skip
    pixels = {}
    for name, extra in runs.items():
        assert main([*common, *extra, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        pixels[name] = np.asarray(Image.open(tmp_path / name / "000001-000.png")).astype(int)
    assert np.array_equal(pixels["default"], pixels["named"]) and np.array_equal(pixels["default"], pixels["folder"])
    assert not np.array_equal(pixels["default"], pixels["plain"])
    embedder = TextEmbedder.from_pretrained(f"{base}::text_encoder_2")
    assert embedder.tokenizer.get_vocab() == TextEmbedder.from_pretrained(f"{base}/text_encoder_2").tokenizer.get_vocab()
    assert len(embedder.tokenizer) > 100  # SDXL's tokenizer_2, not a tokenizer improvised from text_encoder_2/
    vith = [a.replace("bigg", "vith") for a in common]
    assert main([*vith, *runs["default"], "--out", str(tmp_path / "vith-out")]) == 2
    assert "text tower's embeddings are 32-d and this adapter's image embeddings 40-d" in capsys.readouterr().err


def test_t2i_adapters_are_checked_against_the_real_sd15_and_sdxl_unets(tmp_path):
    """The fit of a T2I-Adapter folder is checked from its config before any model loads (diffusers failed in the
    first denoising step): TencentARC's SD1.5 and SDXL adapters' configs fit their own base's real UNet config, and
    an SD1.5 adapter on SDXL is refused with both sides named."""
    import json
    import shutil

    from tiny_models import REFERENCE

    from ipadapter.generate import GenerateConfig, check_t2i_adapter, unet_config

    adapters = {"sd15": {"adapter_type": "full_adapter", "downscale_factor": 8, "in_channels": 1},  # canny_sd15v2
                "sdxl": {"adapter_type": "full_adapter_xl", "downscale_factor": 16, "in_channels": 3}}  # fmt: skip
    for family, fields in adapters.items():
        (tmp_path / family / "unet").mkdir(parents=True)
        (tmp_path / family / "vae").mkdir()
        shutil.copy(REFERENCE / family / "unet_config.json", tmp_path / family / "unet" / "config.json")
        shutil.copy(REFERENCE / family / "vae_config.json", tmp_path / family / "vae" / "config.json")
        (tmp_path / f"t2i-{family}").mkdir()
        (tmp_path / f"t2i-{family}" / "config.json").write_text(json.dumps(
            {"_class_name": "T2IAdapter", "channels": [320, 640, 1280, 1280], "num_res_blocks": 2, **fields}))

    def check(base: str, adapter: str) -> None:
        cfg = GenerateConfig(base=str(tmp_path / base), t2i_adapter=str(tmp_path / f"t2i-{adapter}"))
        check_t2i_adapter(cfg, unet_config(cfg))

    check("sd15", "sd15")
    check("sdxl", "sdxl")
    with pytest.raises(ValueError, match=r"t2i-sd15 does not fit the base's UNet: its feature maps have 320 channels "
                                         r"at 1/8, 640 channels at 1/16, .* the UNet's down blocks have \[320, 640, "
                                         r"1280\] channels, from latents at 1/8 of the image"):  # fmt: skip
        check("sdxl", "sd15")
