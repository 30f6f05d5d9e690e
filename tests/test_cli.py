"""`ipadapter inspect` and `ipadapter convert`, called as functions."""

from __future__ import annotations

import json

from test_checkpoint import reference_tensors
from tiny_models import tiny_unet

from ipadapter import IPAdapter, load_adapter, read_tensors
from ipadapter.cli import main


def _official_plus(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ip-adapter-plus_sd15.safetensors"
    save_file(reference_tensors("ip-adapter-plus_sd15", device="cpu"), str(path))
    return path


def test_inspect_prints_what_users_ask(tmp_path, capsys):
    path = _official_plus(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sd15_plus" in out and "SD1.5" in out and "ViT-H/14 (penultimate hidden states, 1280-d)" in out
    assert "49,087,488" in out and "float16" in out
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_tokens"] == 16 and info["adapted_layers"] == 16 and info["layout"] == "official"


def test_convert_official_to_ours_and_back_is_lossless(tmp_path, capsys):
    path = _official_plus(tmp_path)
    ours, back = tmp_path / "plus.safetensors", tmp_path / "plus_official.bin"
    assert main(["convert", str(path), str(ours), "--to", "ipadapter"]) == 0
    assert main(["convert", str(ours), str(back), "--to", "official"]) == 0
    a, _ = read_tensors(path)
    b, _ = read_tensors(back)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert load_adapter(ours).config.variant == "sd15_plus"


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.bin")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    adapter = IPAdapter.for_unet(tiny_unet("sd15"), "base", image_embed_dim=40)
    adapter.save(tmp_path / "a.safetensors")
    assert main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.txt"), "--to", "official"]) == 2
    assert "official checkpoints are .bin or .safetensors" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "file")]) == 2  # before any model is loaded
    assert "is a file; expected a folder" in capsys.readouterr().err
    assert main(["eval", "tinyworld", "--n", "0"]) == 2
    assert "n must be >= 1, found 0" in capsys.readouterr().err
