"""Tiny-world attribute reader: shipped accuracy, input handling, strict loading and the training entry point."""

import json

import numpy as np

import pytest
import torch
from safetensors.torch import load_file, save_file

from ipadapter.tinyworld.reader import (
    HELD_OUT_SEED,
    TRAIN_SEED,
    AttributeReader,
    ReaderConfig,
    evaluate_reader,
    load_reader,
    main,
    save_reader,
)
from ipadapter.tinyworld.world import ATTRIBUTES, make_dataset

TINY = ReaderConfig(channels=(4, 8), strides=(4, 4))  # 4x4 feature map, a few thousand parameters


def test_shipped_reader_is_small_and_accurate_on_held_out_images():
    torch.set_num_threads(1)
    reader = load_reader()
    assert not reader.training and next(reader.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in reader.parameters()) < 300_000
    seed = 777
    assert seed not in (TRAIN_SEED, HELD_OUT_SEED)
    accuracy = evaluate_reader(reader, 300, seed)
    assert all(value >= 0.98 for value in accuracy.values()), accuracy


def test_predict_accepts_pil_images_and_tensors_alike():
    samples = make_dataset(6, seed=5)
    reader = load_reader()
    from_pil = reader.predict([s.image for s in samples])
    tensor = torch.stack([torch.from_numpy(np.array(s.image)) for s in samples])
    from_tensor = reader.predict(tensor.permute(0, 3, 1, 2).float() / 255)
    assert from_pil == from_tensor == [s.scene for s in samples]
    probs = reader.predict_probs([s.image for s in samples])
    assert [(name, tuple(p.shape)) for name, p in probs.items()] == [(n, (6, len(v))) for n, v in ATTRIBUTES.items()]
    with pytest.raises(ValueError, match=r"expected pixel values in \[0, 1\]; found a minimum of -1.00"):
        reader.predict(torch.full((1, 3, 64, 64), -1.0))
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\); found \(3, 64, 64\)"):
        reader.predict(torch.zeros(3, 64, 64))
    for raw in (tensor.permute(0, 3, 1, 2), tensor.permute(0, 3, 1, 2).float()):  # 0-255 pixels read as all white
        with pytest.raises(ValueError, match=r"expected float pixel values in \[0, 1\]; .*images.float\(\) / 255"):
            reader.predict(raw)


def test_save_load_round_trip_and_strict_errors(tmp_path):
    torch.manual_seed(0)
    reader = AttributeReader(TINY).eval()
    path = tmp_path / "reader.safetensors"
    save_reader(reader, path)
    assert all(v.dtype in (torch.float16, torch.int64) for v in load_file(str(path)).values())
    loaded = load_reader(path)
    x = torch.rand(2, 3, 64, 64)
    for name, p in reader.predict_probs(x).items():
        torch.testing.assert_close(loaded.predict_probs(x)[name], p, atol=2e-3, rtol=0)

    with pytest.raises(FileNotFoundError, match="no reader weights at"):
        load_reader(tmp_path / "missing.safetensors")
    state = load_file(str(path))
    other = json.loads(TINY.to_json()) | {"attributes": {"shape": ["circle", "square"]}}
    save_file(state, str(tmp_path / "other.safetensors"), metadata={"config": json.dumps(other)})
    with pytest.raises(ValueError, match="retrain the reader after changing the world"):
        load_reader(tmp_path / "other.safetensors")
    del state["heads.color.bias"]
    save_file(state, str(tmp_path / "cut.safetensors"), metadata={"config": TINY.to_json()})
    with pytest.raises(ValueError, match=r"missing \['heads.color.bias'\]"):
        load_reader(tmp_path / "cut.safetensors")


def test_main_trains_saves_and_reports(tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    assert main(["--out", str(out), "--num-train", "128", "--steps", "2", "--batch-size", "64", "--eval-n", "8"]) == 0
    assert load_reader(out).config == ReaderConfig()
    printed = capsys.readouterr().out
    assert all(f"held-out accuracy {name}" in printed for name in ATTRIBUTES)
