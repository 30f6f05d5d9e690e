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
    for command in (["eval", "tinyworld"], ["demo"], ["eval", "clip"]):  # before any model loads
        assert main([*command, "--seed", "-9223372036854775809", "--out", str(tmp_path / "seed")]) == 2
        assert "--seed must be within [-2**63, 2**64)" in capsys.readouterr().err
    assert main(["eval", "tinyworld", "--n", "0"]) == 2
    assert "n must be >= 1, found 0" in capsys.readouterr().err
    assert main(["eval", "tinyworld", "--n", "2", "--out", str(tmp_path / "file" / "table.md")]) == 2  # before the run
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_convert_never_writes_what_would_read_back_as_another_adapter(tmp_path, capsys):
    """The official layout has no config: a reader detects it again from keys, shapes and the file name. A FaceID-
    PlusV2 adapter written to a name without "plusv2" would come back as FaceID-Plus (another model), and converting
    onto the input file would replace the original: both are refused and nothing is written."""
    adapter = IPAdapter.for_unet(tiny_unet("sd15"), "faceid_plusv2", image_embed_dim=48)
    ours = tmp_path / "face.safetensors"
    adapter.save(ours)
    assert main(["convert", str(ours), str(tmp_path / "face.bin"), "--to", "official"]) == 2
    err = capsys.readouterr().err
    assert "face.bin would not read back as this adapter (shortcut: True -> False)" in err and "plusv2" in err
    assert not (tmp_path / "face.bin").exists()
    assert main(["convert", str(ours), str(tmp_path / "face-plusv2.bin"), "--to", "official"]) == 0
    back = load_adapter(tmp_path / "face-plusv2.bin")
    assert back.config.shortcut and all((a == b).all() for a, b in zip(back.state_dict().values(),
                                                                         adapter.state_dict().values()))  # fmt: skip
    before = ours.read_bytes()
    assert main(["convert", str(ours), str(ours), "--to", "ipadapter"]) == 2
    assert "is the input file" in capsys.readouterr().err and ours.read_bytes() == before
    # another existing file is the user's: kept unless --force; a folder or a path under a file is named
    notes = tmp_path / "notes.safetensors"
    notes.write_text("mine")
    assert main(["convert", str(ours), str(notes), "--to", "ipadapter"]) == 2
    assert "notes.safetensors exists; it is not replaced without --force" in capsys.readouterr().err
    assert notes.read_text() == "mine"
    assert main(["convert", str(ours), str(notes), "--to", "ipadapter", "--force"]) == 0
    assert load_adapter(notes).config.shortcut
    (tmp_path / "d.safetensors").mkdir()
    assert main(["convert", str(ours), str(tmp_path / "d.safetensors"), "--to", "ipadapter"]) == 2
    assert "is a folder; expected a file name" in capsys.readouterr().err
    assert main(["convert", str(ours), str(notes / "x.safetensors"), "--to", "ipadapter"]) == 2
    assert "notes.safetensors is a file, not a folder" in capsys.readouterr().err


def test_inspect_counts_the_adapter_of_a_trainer_state_not_its_unet(tmp_path, capsys):
    import torch

    source = reference_tensors("ip-adapter_sd15", device="cpu")
    state = {"unet.conv_in.weight": torch.zeros(320, 4, 3, 3, dtype=torch.float32)}
    for key, value in source.items():
        section, rest = key.split(".", 1)
        state[("image_proj_model." if section == "image_proj" else "adapter_modules.") + rest] = value
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert main(["inspect", str(tmp_path / "pytorch_model.bin"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(v.numel() for v in source.values())
    assert info["dtype"] == ", ".join(sorted({str(v.dtype).removeprefix("torch.") for v in source.values()}))


def test_ctrl_c_ends_a_command_with_one_line(tmp_path, capsys, monkeypatch):
    import ipadapter.tinyworld.demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ipadapter.tinyworld.demo, "run_demo", interrupted)
    assert main(["demo", "--out", str(tmp_path)]) == 130  # the shell's status for SIGINT
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_hub_id_that_cannot_be_fetched_is_named_with_why(tmp_path, capsys, monkeypatch):
    """Offline (the tests set HF_HUB_OFFLINE), diffusers reports an uncached hub id only as "X does not appear to have
    a file named model_index.json"; the error names the flag and says the hub could not be used and what to do."""
    from huggingface_hub import constants
    from PIL import Image

    from ipadapter.training.loop import main as train_main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "ref.png")
    assert main(["generate", "--base", "nobody/not-a-model", "--image-encoder", "tinyworld", "--image",
                 str(tmp_path / "ref.png"), "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--base nobody/not-a-model is a hub id not found locally nor in the Hugging Face cache, and " \
           "HF_HUB_OFFLINE is set" in err and "huggingface-cli download" in err  # fmt: skip
    assert train_main(["--image-encoder", "nobody/no-encoder", "--data", "tinyworld:8", "--output",
                       str(tmp_path / "run"), "--max-steps", "1"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--image-encoder nobody/no-encoder is a hub id not found locally" in err and "--base" not in err
    # other errors are left as they are
    assert main(["inspect", str(tmp_path / "nope.bin")]) == 2
    assert "Hugging Face" not in capsys.readouterr().err
