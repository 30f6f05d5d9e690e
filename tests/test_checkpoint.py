"""Official checkpoint layouts: detection, strict validation, round trips and safe loading."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import REFERENCE, real_unet_on_meta, reference_json, tiny_unet

from ipadapter import IPAdapter, load_adapter, read_tensors
from ipadapter.checkpoint import adapter_from_tensors, describe, internal_to_official, official_to_internal
from ipadapter.layers import cross_attention_layers

KEY_LISTS = sorted(p.stem for p in (REFERENCE / "ip_adapter" / "checkpoint_keys").glob("*.json"))

# official file -> (variant we report, tokens, family, encoder width, feature)
EXPECTED = {
    "ip-adapter_sd15": ("sd15", 4, "SD1.5", 1024, "pooled"),
    "ip-adapter_sd15_vit-G": ("sd15_vit-G", 4, "SD1.5", 1280, "pooled"),
    "ip-adapter-plus_sd15": ("sd15_plus", 16, "SD1.5", 1280, "penultimate"),
    "ip-adapter-full-face_sd15": ("sd15_full_face", 257, "SD1.5", 1280, "penultimate"),
    "ip-adapter_sdxl": ("sdxl", 4, "SDXL", 1280, "pooled"),
    "ip-adapter_sdxl_vit-h": ("sdxl_vit-h", 4, "SDXL", 1024, "pooled"),
    "ip-adapter-plus_sdxl_vit-h": ("sdxl_plus_vit-h", 16, "SDXL", 1280, "penultimate"),
    "ip-adapter-faceid_sd15": ("faceid_sd15", 4, "SD1.5", 0, "none"),
    "ip-adapter-faceid-plusv2_sd15": ("faceid_plusv2_sd15", 4, "SD1.5", 1280, "penultimate"),
    "ip-adapter-faceid-portrait_sd15": ("faceid_portrait_sd15", 16, "SD1.5", 0, "none"),
    "ip-adapter-faceid_sdxl": ("faceid_sdxl", 4, "SDXL", 0, "none"),
    "ip-adapter-faceid-plusv2_sdxl": ("faceid_plusv2_sdxl", 4, "SDXL", 1280, "penultimate"),
    "ip-adapter-faceid-portrait_sdxl": ("faceid_portrait_sdxl", 16, "SDXL", 0, "none"),
}


def reference_tensors(name: str, device: str = "meta", dtype=torch.float16) -> dict[str, torch.Tensor]:
    spec = reference_json(f"ip_adapter/checkpoint_keys/{name}.json")
    if device == "meta":
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in spec["tensors"].items()}
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g).to(dtype) for k, shape in spec["tensors"].items()}


def test_every_reference_layout_is_covered():
    assert set(KEY_LISTS) == set(EXPECTED)


@pytest.mark.parametrize("family, layers", [("sd15", 16), ("sdxl", 70)])
def test_real_unets_have_the_official_cross_attention_layers(family, layers):
    unet = real_unet_on_meta(family)
    cross = cross_attention_layers(unet)
    assert len(cross) == layers
    index_map = reference_json(f"ip_adapter/attn_processor_index_map_{family}.json")["processors"]
    official = [e for e in index_map if e["has_to_k_ip_to_v_ip"]]
    assert [(e["index"], e["diffusers_attn_processor"].removesuffix(".processor"), e["hidden_size"]) for e in official] == [
        (layer.index, layer.name, layer.hidden_size) for layer in cross
    ]


@pytest.mark.parametrize("name", KEY_LISTS)
def test_full_size_official_layouts_are_detected_and_fit_the_real_unet(name):
    variant, tokens, family, embed_dim, feature = EXPECTED[name]
    spec = reference_json(f"ip_adapter/checkpoint_keys/{name}.json")
    adapter = adapter_from_tensors(reference_tensors(name), {}, name + ".bin")
    cfg = adapter.config
    assert (cfg.variant, cfg.num_tokens, cfg.base_family, cfg.image_embed_dim, cfg.image_feature) == (
        variant, tokens, family, embed_dim, feature,
    )
    assert adapter.num_parameters() == spec["parameter_count"]
    unet = real_unet_on_meta("sdxl" if family == "SDXL" else "sd15")
    adapter._check_unet(unet)  # every layer width and the layer count match the real UNet
    # Our names map back to exactly the official keys.
    official = internal_to_official(adapter.state_dict())
    assert list(official) == list(spec["tensors"])


def test_faceid_plus_v1_and_v2_are_told_apart_by_file_name_like_comfyui():
    tensors = reference_tensors("ip-adapter-faceid-plusv2_sd15")
    assert not adapter_from_tensors(tensors, {}, "ip-adapter-faceid-plus_sd15.bin").config.shortcut
    assert adapter_from_tensors(tensors, {}, "ip-adapter-faceid-plusv2_sd15.bin").config.shortcut
    assert adapter_from_tensors(tensors, {}, "ip-adapter-faceid-plusv2_sd15.bin").config.variant == "faceid_plusv2_sd15"


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_official_round_trip_is_bit_exact(tmp_path, suffix):
    source = reference_tensors("ip-adapter_sd15", device="cpu")
    path = tmp_path / f"ip-adapter_sd15{suffix}"
    if suffix == ".bin":
        nested = {"image_proj": {}, "ip_adapter": {}}
        for key, value in source.items():
            section, rest = key.split(".", 1)
            nested[section][rest] = value
        torch.save(nested, path)
    else:
        from safetensors.torch import save_file

        save_file(source, str(path))
    adapter = load_adapter(path)
    assert adapter.image_proj.proj.weight.dtype == torch.float16  # the file's dtype is kept
    out = tmp_path / f"again{suffix}"
    adapter.save(out, layout="official")
    back, _ = read_tensors(out)
    assert set(back) == set(source)
    for key in source:
        assert torch.equal(back[key], source[key]), key
    if suffix == ".bin":  # nested like the official files, tensors in the official order
        raw = torch.load(out, weights_only=True)
        assert list(raw) == ["image_proj", "ip_adapter"]
        assert list(back) == list(source)


def test_own_format_describes_itself_and_round_trips(tmp_path):
    unet = tiny_unet("sd15")
    adapter = IPAdapter.for_unet(unet, "plus", image_embed_dim=48)
    adapter.save(tmp_path / "mine.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ipadapter_config"])["projection"] == "resampler"
    again = load_adapter(tmp_path / "mine.safetensors", unet=unet)
    assert again.config == adapter.config
    for (k, a), (k2, b) in zip(adapter.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    # ours -> official -> ours keeps every tensor
    assert official_to_internal(internal_to_official(adapter.state_dict())).keys() == adapter.state_dict().keys()


def test_official_trainer_state_is_read_without_hand_conversion(tmp_path):
    """The official tutorial's accelerate state (`image_proj_model.*`, `adapter_modules.*`, `unet.*`) loads."""
    source = reference_tensors("ip-adapter_sd15", device="cpu")
    state = {"unet.conv_in.weight": torch.zeros(3)}
    for key, value in source.items():
        section, rest = key.split(".", 1)
        state[("image_proj_model." if section == "image_proj" else "adapter_modules.") + rest] = value
    torch.save(state, tmp_path / "pytorch_model.bin")
    adapter = load_adapter(tmp_path / "pytorch_model.bin")
    assert adapter.config.variant == "sd15"
    assert torch.equal(adapter.layers[0].to_k_ip.weight, source["ip_adapter.1.to_k_ip.weight"])


def test_accelerates_default_save_of_the_official_trainer_loads(tmp_path):
    """`accelerator.save_state()` as tutorial_train.py calls it writes model.safetensors, which keeps one name of
    tied tensors: the processors are both `adapter_modules.*` and `unet.*.processor.*`, and only the latter may be
    kept (the official repo's "lost adapter keys" issues). The weights come back from the UNet's processor names."""
    from accelerate import Accelerator
    from torch import nn

    class AttnProcessor(nn.Module):  # the official self-attention processor: an nn.Module without parameters
        pass

    class Processor(nn.Module):  # the official IPAttnProcessor's parameters (its forward is not needed here)
        def __init__(self, hidden: int, cross: int) -> None:
            super().__init__()
            self.to_k_ip = nn.Linear(cross, hidden, bias=False)
            self.to_v_ip = nn.Linear(cross, hidden, bias=False)

    class Trainer(nn.Module):  # tutorial_train.py's IPAdapter: unet, image_proj_model, adapter_modules
        def __init__(self, unet) -> None:
            super().__init__()
            self.unet = unet
            self.image_proj_model = nn.ModuleDict({"proj": nn.Linear(40, 4 * 32), "norm": nn.LayerNorm(32)})
            self.adapter_modules = nn.ModuleList(unet.attn_processors.values())

    unet = tiny_unet("sd15")
    widths = {layer.name: layer.hidden_size for layer in cross_attention_layers(unet)}
    torch.manual_seed(0)
    unet.set_attn_processor({name: Processor(widths[name.removesuffix(".processor")], 32)
                             if name.removesuffix(".processor") in widths else AttnProcessor()
                             for name in unet.attn_processors})  # fmt: skip
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(Trainer(unet))
    accelerator.save_state(str(tmp_path / "checkpoint"))  # as tutorial_train.py, with accelerate's defaults
    saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert not any(k.startswith("adapter_modules.") for k in saved)  # what made these files unloadable
    adapter = load_adapter(tmp_path / "checkpoint" / "model.safetensors")
    trained = [m for m in model.adapter_modules if isinstance(m, Processor)]
    assert len(adapter.layers) == len(trained) == len(widths)
    for ours, theirs in zip(adapter.layers, trained):
        assert torch.equal(ours.to_k_ip.weight, theirs.to_k_ip.weight)
        assert torch.equal(ours.to_v_ip.weight, theirs.to_v_ip.weight)


# ---- rejections ---------------------------------------------------------------------------------------------
def test_sdxl_adapter_on_sd15_unet_is_rejected_before_anything_changes():
    adapter = adapter_from_tensors(reference_tensors("ip-adapter_sdxl"), {}, "ip-adapter_sdxl.bin")
    unet = real_unet_on_meta("sd15")
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match=r"for SDXL \(70 cross-attention layers.*UNet is SD1.5 \(16"):
        adapter.attach(unet)
    assert dict(unet.attn_processors) == before and not adapter.attached
    with pytest.raises(ValueError, match=r"for SDXL \(70 cross-attention layers, context width 2048\); the UNet is "
                                         r"custom \(16 cross-attention layers of context width \d+\)$"):  # fmt: skip
        adapter.attach(tiny_unet("sd15"))  # a custom family is described once


def test_an_official_variants_name_is_given_only_to_its_family_and_encoder():
    """A new adapter named after an official layout carries that name (training labels its checkpoints with it):
    `--variant sdxl` on an SD1.5 base, or `sd15` over a ViT-bigG encoder, made adapters that said what they are not."""
    unet = real_unet_on_meta("sd15")
    assert IPAdapter.for_unet(unet, "sd15", init_from_unet=False).config.variant == "sd15"
    with pytest.raises(ValueError, match=r"variant 'sdxl' is the official SDXL layout; this UNet is SD1.5: use a generic"):
        IPAdapter.for_unet(unet, "sdxl", init_from_unet=False)
    with pytest.raises(ValueError, match=r"variant 'sd15' reads 1024-d pooled features .*; the image encoder gives "
                                         r"1280-d .*: use the variant of that encoder"):  # fmt: skip
        IPAdapter.for_unet(unet, "sd15", image_embed_dim=1280, init_from_unet=False)
    with pytest.raises(ValueError, match=r"variant 'sd15_plus' is the official SD1.5 layout; this UNet is custom"):
        IPAdapter.for_unet(tiny_unet("sd15"), "sd15_plus", image_embed_dim=48)


def test_vit_bigg_encoder_for_vit_h_adapter_is_rejected():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ipadapter import check_encoder

    adapter = adapter_from_tensors(reference_tensors("ip-adapter_sd15"), {}, "ip-adapter_sd15.bin")
    cfg = CLIPVisionConfig(**{k: v for k, v in reference_json("ip_adapter/image_encoder_vit_bigg_config.json").items()
                              if k in CLIPVisionConfig().to_dict() and not k.startswith("_") and k != "architectures"})
    with torch.device("meta"):
        bigg = CLIPVisionModelWithProjection(cfg)
    with pytest.raises(ValueError, match=r"expects 1024-d pooled features from ViT-H/14.*gives 1280-d \(ViT-bigG/14"):
        check_encoder(adapter.config, bigg)


def test_an_encoder_without_a_trained_projection_is_refused_for_pooled_adapters(tmp_path):
    """A CLIPVisionModel folder (no visual_projection) loads as CLIPVisionModelWithProjection with a random
    projection: its image_embeds would be noise. Pooled adapters refuse it; penultimate ones need no projection."""
    from tiny_models import tiny_clip_vision
    from transformers import CLIPVisionModel

    from ipadapter import ImageEncoder, check_encoder

    vision = tiny_clip_vision(image_size=28)
    CLIPVisionModel(vision.config).save_pretrained(tmp_path / "no-projection")
    vision.save_pretrained(tmp_path / "full")
    encoder = ImageEncoder.from_pretrained(tmp_path / "no-projection")
    assert not encoder.has_projection and ImageEncoder.from_pretrained(tmp_path / "full").has_projection
    base = IPAdapter.for_unet(tiny_unet("sd15"), "base", image_embed_dim=encoder.pooled_dim).config
    with pytest.raises(ValueError, match=r"reads pooled, projected image_embeds; the image encoder has no trained"):
        check_encoder(base, encoder)
    check_encoder(IPAdapter.for_unet(tiny_unet("sd15"), "plus", image_embed_dim=encoder.hidden_dim).config, encoder)


def test_plus_adapter_given_pooled_embeddings_says_what_it_needs():
    adapter = adapter_from_tensors(reference_tensors("ip-adapter-plus_sd15", device="cpu"), {}, "plus.bin")
    with pytest.raises(ValueError, match=r"penultimate hidden states.*found pooled image embeddings of shape \(1, 1280\)"):
        adapter.project(image=torch.zeros(1, 1280, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"expects 1280-d penultimate features.*found 1024-d"):
        adapter.project(image=torch.zeros(1, 257, 1024, dtype=torch.float16))


def test_a_half_precision_adapter_takes_float32_features_and_faces():
    """Encoder features or ArcFace embeddings in float32 (numpy, insightface) given to a float16 / bfloat16 adapter."""
    tensors = {k: 0.02 * v for k, v in reference_tensors("ip-adapter-faceid-plusv2_sd15", device="cpu").items()}
    adapter = adapter_from_tensors(tensors, {}, "v2.bin")  # weights at a trained scale: float16 does not overflow
    image, face = torch.randn(1, 257, 1280), torch.randn(1, 512)
    expected = adapter.float().project(image=image, face_id=face)
    for dtype in (torch.float16, torch.bfloat16):
        tokens = adapter.to(dtype).project(image=image, face_id=face)
        assert tokens.dtype == dtype and torch.allclose(tokens.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, suffix):
    adapter = IPAdapter.for_unet(tiny_unet("sd15"), "base", image_embed_dim=40)
    path = tmp_path / f"ip{suffix}"
    adapter.save(path, layout="official")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(path)


def test_file_that_is_not_a_checkpoint(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    os.rename(tmp_path / "picture.png", tmp_path / "adapter.bin")
    with pytest.raises(ValueError, match="not a .*PyTorch checkpoint"):
        load_adapter(tmp_path / "adapter.bin")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_adapter(tmp_path / "missing.safetensors")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match=r"not an IP-Adapter checkpoint: expected `image_proj\.\*`.*'weight'\]$"):
        load_adapter(tmp_path / "other.bin")
    for keys, hint in ((["lora_unet_down_blocks_0.lora_down.weight"], "this looks like a LoRA .*load_lora_weights"),
                       (["model.diffusion_model.input_blocks.0.0.weight"], "this looks like a UNet or a whole Stable Diffusion checkpoint"),
                       (["vision_model.embeddings.patch_embedding.weight"], "this looks like a CLIP image encoder")):  # fmt: skip
        save_file({k: torch.zeros(2) for k in keys}, str(tmp_path / "other.safetensors"))
        with pytest.raises(ValueError, match=f"not an IP-Adapter checkpoint: .* - {hint}"):
            load_adapter(tmp_path / "other.safetensors")


class _Exploit:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"image_proj": {"proj.weight": _Exploit(str(marker))}}, f, protocol=protocol)
    with pytest.raises(ValueError, match="refused to load .*could run code"):
        load_adapter(tmp_path / "evil.bin")
    assert not marker.exists()


def test_wrong_shape_names_the_tensor(tmp_path):
    tensors = reference_tensors("ip-adapter_sd15")
    tensors["ip_adapter.5.to_v_ip.weight"] = torch.empty(640, 1024, device="meta")
    with pytest.raises(ValueError, match=r"to_v_ip.*expected|layers\.2\.to_v_ip"):
        adapter_from_tensors(tensors, {}, "broken.bin")
    del tensors["ip_adapter.5.to_v_ip.weight"]
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. \['ip_adapter\.5\.to_v_ip\.weight'\]\)"):  # the file's name
        adapter_from_tensors(tensors, {}, "broken.bin")


def test_describe_answers_which_encoder_goes_with_a_file(tmp_path):
    from safetensors.torch import save_file

    save_file(reference_tensors("ip-adapter_sd15_vit-G", device="cpu"), str(tmp_path / "ip-adapter_sd15_vit-G.safetensors"))
    info = describe(tmp_path / "ip-adapter_sd15_vit-G.safetensors")
    assert info["variant"] == "sd15_vit-G"
    assert info["image_encoder"].startswith("ViT-bigG/14 (pooled")
    assert info["base_family"] == "SD1.5" and info["adapted_layers"] == 16 and info["num_tokens"] == 4
    assert info["parameters"] == 23_106_048 and info["dtype"] == "float16"
