"""Damaged or unusual checkpoints: each is a one-line ValueError that names the file, the tensor or field, what was
expected and what was found - never an IndexError / KeyError / TypeError, never a healthy neighbour blamed."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_checkpoint import reference_tensors
from tiny_models import tiny_unet

from ipadapter import IPAdapter, load_adapter, read_tensors
from ipadapter.checkpoint import adapter_from_tensors, describe
from ipadapter.cli import main


def _tiny_file(tmp_path, kind: str = "base", layout: str = "official", name: str = "tiny.safetensors"):
    path = tmp_path / name
    IPAdapter.for_unet(tiny_unet("sd15"), kind, image_embed_dim=40).save(path, layout=layout)
    return path


# ---- a tensor with the wrong number of dimensions ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "convert"])
@pytest.mark.parametrize("key", ["ip_adapter.1.to_k_ip.weight", "image_proj.proj.weight"])
def test_a_flattened_tensor_is_named_with_its_shape(tmp_path, capsys, command, key):
    path = _tiny_file(tmp_path)
    tensors = load_file(str(path))
    tensors[key] = tensors[key].flatten()
    save_file(tensors, str(path))
    out = tmp_path / "out.safetensors"
    assert main(["inspect", str(path)] if command == "inspect" else ["convert", str(path), str(out), "--to", "ipadapter"]) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint tiny.safetensors: {key} should be a 2-d tensor with no empty dimension, "
        f"found shape ({tensors[key].numel()},)\n"
    )
    assert not out.exists()


def test_an_empty_dimension_is_named_not_divided_by():
    tensors = reference_tensors("ip-adapter_sd15")
    tensors["image_proj.norm.weight"] = torch.empty(0, device="meta")
    with pytest.raises(ValueError, match=r"^checkpoint x\.bin: image_proj\.norm\.weight should be a 1-d tensor with no "
                                         r"empty dimension, found shape \(0,\)$"):  # fmt: skip
        adapter_from_tensors(tensors, {}, "x.bin")


# ---- our own format's metadata -----------------------------------------------------------------------------------
def _own_file(tmp_path, edit) -> str:
    """A plus adapter in our format after `edit(metadata)`, which sees the config as a dict; returns its path."""
    source = _tiny_file(tmp_path, "plus", layout="ipadapter", name="source.safetensors")
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    metadata["ipadapter_config"] = json.loads(metadata["ipadapter_config"])
    edit(metadata)
    if isinstance(metadata.get("ipadapter_config"), dict):
        metadata["ipadapter_config"] = json.dumps(metadata["ipadapter_config"])
    path = tmp_path / "mine.safetensors"
    save_file(load_file(str(source)), str(path), metadata=metadata)
    return str(path)


BAD_METADATA = {  # case: (edit of the metadata, the message after "checkpoint mine.safetensors: ")
    "no config": (
        lambda m: m.pop("ipadapter_config"),
        r"metadata says format='ipadapter' but has no 'ipadapter_config' field \(expected the adapter config as JSON\); "
        r"found metadata fields \['format', 'format_version'\]",
    ),
    "invalid JSON": (
        lambda m: m.update(ipadapter_config='{"projection": "resampler",'),
        r"metadata field 'ipadapter_config' is not a valid adapter config: AdapterConfig is not valid JSON \(Expecting "
        r"property name enclosed in double quotes: line 1 column 28 \(char 27\)\)",
    ),
    "unknown resampler field": (
        lambda m: m["ipadapter_config"]["resampler"].update(heads_per_block=2),
        r"metadata field 'ipadapter_config' is not a valid adapter config: unknown AdapterConfig\.resampler fields "
        r"\['heads_per_block'\]; expected a subset of \['depth', 'dim', 'dim_head', 'ff_mult', 'heads'\]",
    ),
    "null sizes": (
        lambda m: m["ipadapter_config"].update(layer_hidden_sizes=None),
        r"metadata field 'ipadapter_config' is not a valid adapter config: AdapterConfig field 'layer_hidden_sizes': "
        r"expected a list of whole numbers >= 0, found null",
    ),
    "text size": (
        lambda m: m["ipadapter_config"].update(cross_attention_dim="32"),
        r"metadata field 'ipadapter_config' is not a valid adapter config: AdapterConfig field 'cross_attention_dim': "
        r'expected a whole number >= 0, found "32"',
    ),
    "missing field": (
        lambda m: m["ipadapter_config"].pop("projection"),
        r"metadata field 'ipadapter_config' is not a valid adapter config: AdapterConfig: required fields "
        r"\['projection'\] are missing",
    ),
    "not an object": (
        lambda m: m.update(ipadapter_config="[1, 2]"),
        r"metadata field 'ipadapter_config' is not a valid adapter config: AdapterConfig: expected a JSON object of "
        r"fields, found \[1, 2\]",
    ),
    "newer version": (
        lambda m: m.update(format_version="99"),
        r"metadata field 'format_version' is '99', a newer format than this ipadapter reads \(version 1 and older\): "
        r"upgrade ipadapter to load it",
    ),
    "unreadable version": (
        lambda m: m.update(format_version="v2"),
        r"metadata field 'format_version' is 'v2'; expected a whole number \(this ipadapter reads format version 1 "
        r"and older\)",
    ),
}


@pytest.mark.parametrize("case", BAD_METADATA)
def test_bad_own_metadata_names_the_file_and_field(tmp_path, capsys, case):
    edit, message = BAD_METADATA[case]
    path = _own_file(tmp_path, edit)
    with pytest.raises(ValueError, match=r"^checkpoint mine\.safetensors: " + message + "$"):
        load_adapter(path)
    assert main(["inspect", path]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint mine.safetensors: metadata")


@pytest.mark.parametrize("version", ["1", "0", None])
def test_what_we_write_and_older_versions_still_load(tmp_path, version):
    def edit(metadata):
        if version is None:
            del metadata["format_version"]
        else:
            metadata["format_version"] = version

    path = _own_file(tmp_path, edit)
    assert load_adapter(path).config == load_adapter(tmp_path / "source.safetensors").config


# ---- the odd tensor out is blamed, not its neighbour -------------------------------------------------------------
def _broken(name: str, key: str, shape: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    tensors = reference_tensors(name)
    if shape is None:
        del tensors[key]
    else:
        tensors[key] = torch.empty(shape, dtype=torch.float16, device="meta")
    return tensors


BLAME = {
    "to_k_ip against its to_v_ip": (
        "ip-adapter_sd15", "ip_adapter.1.to_k_ip.weight", (321, 768),
        r"the query width of attention layer 1 differs between ip_adapter\.1\.to_k_ip\.weight \(321, 768\) and "
        r"ip_adapter\.1\.to_v_ip\.weight \(320, 768\); expected one size - one of them is damaged",
    ),
    "to_k_ip against its to_v_ip and LoRA": (
        "ip-adapter-faceid_sd15", "ip_adapter.1.to_k_ip.weight", (321, 768),
        r"ip_adapter\.1\.to_k_ip\.weight \(321, 768\): expected the query width of attention layer 1 to be 320, as in 7 "
        r"other tensors \(e\.g\. ip_adapter\.1\.to_v_ip\.weight \(320, 768\)\); found 321",
    ),
    "to_v_ip context width": (
        "ip-adapter_sd15", "ip_adapter.31.to_v_ip.weight", (1280, 1024),
        r"ip_adapter\.31\.to_v_ip\.weight \(1280, 1024\): expected the context width \(cross_attention_dim\) to be 768, "
        r"as in 32 other tensors \(e\.g\. image_proj\.norm\.weight \(768,\)\); found 1024",
    ),
    "projection context width": (
        "ip-adapter_sd15", "image_proj.norm.weight", (1024,),
        r"image_proj\.norm\.weight \(1024,\): expected the context width \(cross_attention_dim\) to be 768, as in 32 other "
        r"tensors \(e\.g\. ip_adapter\.1\.to_k_ip\.weight \(320, 768\)\); found 1024",
    ),
    "LoRA down rank": (
        "ip-adapter-faceid_sd15", "ip_adapter.0.to_q_lora.down.weight", (127, 320),
        r"ip_adapter\.0\.to_q_lora\.down\.weight \(127, 320\): expected the LoRA rank to be 128, as in 255 other tensors "
        r"\(e\.g\. ip_adapter\.0\.to_q_lora\.up\.weight \(320, 128\)\); found 127",
    ),
    "LoRA up width": (
        "ip-adapter-faceid_sd15", "ip_adapter.2.to_out_lora.up.weight", (321, 128),
        r"ip_adapter\.2\.to_out_lora\.up\.weight \(321, 128\): expected the query width of attention layer 2 to be 320, as "
        r"in 7 other tensors \(e\.g\. ip_adapter\.2\.to_q_lora\.up\.weight \(320, 128\)\); found 321",
    ),
    "stray even index": (
        "ip-adapter_sd15", "ip_adapter.0.to_k_ip.weight", (320, 768),
        r"unexpected tensor ip_adapter\.0\.to_k_ip\.weight: image keys/values sit on cross-attention layers, at odd "
        r"indices \(here 1, 3, \.\.\., 31\); found index 0",
    ),
}


@pytest.mark.parametrize("case", BLAME)
def test_a_damaged_tensor_is_named_with_its_healthy_partners(case):
    name, key, shape, message = BLAME[case]
    with pytest.raises(ValueError, match=r"^checkpoint broken\.bin: " + message + "$"):
        adapter_from_tensors(_broken(name, key, shape), {}, "broken.bin")


def test_a_missing_layer_is_named_by_its_index():
    tensors = _broken("ip-adapter_sd15", "ip_adapter.5.to_k_ip.weight", None)
    del tensors["ip_adapter.5.to_v_ip.weight"]
    with pytest.raises(ValueError, match=r"^checkpoint broken\.bin: expected to_k_ip / to_v_ip at every odd ip_adapter "
                                         r"index 1, 3, \.\.\., 31 \(one per cross-attention layer\); none found at \[5\]$"):  # fmt: skip
        adapter_from_tensors(tensors, {}, "broken.bin")


# ---- dtypes --------------------------------------------------------------------------------------------------------
TORCH_DTYPES = ["bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float16", "bfloat16",
                "float32", "float64", "complex64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                "float8_e8m0fnu", "float4_e2m1fn_x2"]  # fmt: skip


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_every_dtype_torch_has_reads_with_or_without_data(tmp_path, dtype):
    if not hasattr(torch, dtype):
        pytest.skip(f"this torch has no {dtype}")
    tensor = torch.zeros(2, 16, dtype=torch.uint8).view(getattr(torch, dtype))
    save_file({"t": tensor}, str(tmp_path / "t.safetensors"))
    full, _ = read_tensors(tmp_path / "t.safetensors")
    meta, _ = read_tensors(tmp_path / "t.safetensors", shapes_only=True)
    assert (full["t"].dtype, full["t"].shape) == (tensor.dtype, tensor.shape)
    assert (meta["t"].dtype, meta["t"].shape, meta["t"].device.type) == (tensor.dtype, tensor.shape, "meta")


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_a_float8_adapter_is_inspected_not_called_corrupt(tmp_path, capsys, dtype):
    path = _tiny_file(tmp_path)
    save_file({k: v.to(getattr(torch, dtype)) for k, v in load_file(str(path)).items()}, str(path))
    info = describe(path)
    assert (info["variant"], info["dtype"], info["adapted_layers"]) == ("base", dtype, 16)
    assert load_adapter(path).layers[0].to_k_ip.weight.dtype == getattr(torch, dtype)
    assert main(["inspect", str(path)]) == 0
    assert dtype in capsys.readouterr().out


def _raw_safetensors(path, dtype: str, nbytes: int) -> None:
    """A one-tensor safetensors file written by hand: 8-byte header length, JSON header, data."""
    header = json.dumps({"weird": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(nbytes))


@pytest.mark.parametrize("dtype, nbytes", [("F6_E2M3", 3), ("F99", 4)])  # safetensors knows F6 (torch not), not F99
@pytest.mark.parametrize("shapes_only", [True, False])
def test_an_unknown_dtype_is_unsupported_not_corrupt(tmp_path, dtype, nbytes, shapes_only):
    path = tmp_path / "odd.safetensors"
    _raw_safetensors(path, dtype, nbytes)
    with pytest.raises(ValueError, match=rf"^{path}: unsupported tensor dtype {dtype} in key 'weird'; this torch "
                                         r"\([^)]+\) reads BOOL, U8, .*F8_E4M3, F8_E5M2"):  # fmt: skip
        read_tensors(path, shapes_only=shapes_only)


# ---- from the core-loading audit -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, prefix", [("ip-adapter-plus_sd15", "image_proj.layers.3."),
                                          ("ip-adapter-faceid-plusv2_sd15", "image_proj.perceiver_resampler.layers.3.")])
def test_a_resampler_missing_its_last_block_is_refused(name, prefix):
    tensors = {k: v for k, v in reference_tensors(name).items() if not k.startswith(prefix)}
    with pytest.raises(ValueError, match=r"an official resampler has 4 blocks \(layers\.0 to layers\.3\); found 3 "
                                         r"\(0, 1, 2\) - the file is incomplete"):  # fmt: skip
        adapter_from_tensors(tensors, {}, "broken.bin")


def test_a_missing_tensor_is_named_as_the_file_names_it():
    tensors = _broken("ip-adapter-faceid_sd15", "ip_adapter.3.to_v_lora.up.weight", None)
    with pytest.raises(ValueError, match=r"1 missing \(e\.g\. \['ip_adapter\.3\.to_v_lora\.up\.weight'\]\)"):
        adapter_from_tensors(tensors, {}, "broken.bin")


def test_integer_weights_are_a_clear_error_not_a_load_state_dict_trace(tmp_path, capsys):
    tensors = reference_tensors("ip-adapter_sd15", device="cpu")
    tensors["image_proj.proj.weight"] = tensors["image_proj.proj.weight"].to(torch.int8)
    save_file(tensors, str(tmp_path / "q.safetensors"))
    assert main(["inspect", str(tmp_path / "q.safetensors")]) == 2
    assert "image_proj.proj.weight: expected floating-point weights, found int8" in capsys.readouterr().err


def test_faceid_without_its_lora_is_not_called_portrait():
    tensors = {k: v for k, v in reference_tensors("ip-adapter-faceid_sd15").items() if "_lora" not in k}
    assert adapter_from_tensors(tensors, {}, "ip-adapter-faceid_sd15.bin").config.variant == "custom"


@pytest.mark.parametrize("name", ["adapter.bin", "blob"])
def test_a_safetensors_file_under_another_name_reads(tmp_path, name):
    path = _tiny_file(tmp_path)
    path.rename(tmp_path / name)
    assert load_adapter(tmp_path / name).config.variant == "base"


def test_a_resampler_of_another_depth_is_saved_in_our_layout_only(tmp_path):
    """The official layout has no field for the depth (the official code builds 4 blocks, and reading checks it):
    another depth is refused there, kept in ours."""
    from dataclasses import replace

    from tiny_models import tiny_unet

    from ipadapter import IPAdapter

    config = IPAdapter.for_unet(tiny_unet("sd15"), "plus", image_embed_dim=40).config
    adapter = IPAdapter(replace(config, resampler=replace(config.resampler, depth=2)))
    with pytest.raises(ValueError, match="the official layout holds resamplers of depth 4; this one has 2"):
        adapter.save(tmp_path / "plus.bin", layout="official")
    adapter.save(tmp_path / "plus.safetensors")
    assert load_adapter(tmp_path / "plus.safetensors").config.resampler.depth == 2
