"""Models derived from the tiny world (a fine-tuned UNet, a silhouette ControlNet): the training scripts run, write
loadable diffusers folders, and the shipped adapter works on / beside them unchanged."""

from __future__ import annotations

import numpy as np
import torch

from ipadapter import IPAdapter, ImageEncoder
from ipadapter.prompter import ImagePrompter
from ipadapter.sources import resolve_adapter, resolve_base, resolve_image_encoder
from ipadapter.tinyworld.derived import controlnet, finetune, render_scenes, silhouette
from ipadapter.tinyworld.world import render


def test_silhouette_keeps_geometry_and_drops_appearance():
    import dataclasses

    (scene, seed), = render_scenes(1, 3, {"color": "red", "background": "pink", "pattern": "solid"})
    mask = np.asarray(silhouette(scene, seed), dtype=np.float32).mean(-1) / 255 > 0.5  # (64, 64)
    image = np.asarray(render(scene, seed=seed), dtype=np.float32)
    drawn = np.abs(image - image[0, 0]).sum(-1) > 60  # where the scene differs from its background
    assert (mask & drawn).sum() / (mask | drawn).sum() > 0.9
    other = dataclasses.replace(scene, color="blue", background="white", pattern="dotted")
    assert np.array_equal(np.asarray(silhouette(other, seed)), np.asarray(silhouette(scene, seed)))


def test_finetuned_model_and_controlnet_train_and_work_with_the_shipped_adapter(tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    tuned = finetune("tinyworld", tmp_path / "striped", {"pattern": "striped"}, steps=2, batch_size=4, num_scenes=8)
    net_path = controlnet("tinyworld", tmp_path / "controlnet", steps=2, batch_size=4, num_scenes=8)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(tuned), controlnet=ControlNetModel.from_pretrained(str(net_path)))
    pipe.set_progress_bar_config(disable=True)
    base_unet = StableDiffusionPipeline.from_pretrained(resolve_base("tinyworld")).unet
    assert any(not torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), base_unet.state_dict().values()))
    encoder = ImageEncoder.from_pretrained(resolve_image_encoder(str(tuned)))
    prompter = ImagePrompter(pipe, IPAdapter.from_file(resolve_adapter("tinyworld-base")), encoder)
    (scene, seed), = render_scenes(1, 5)
    out = prompter(image=render(scene), pipeline_image=silhouette(scene, seed), num_inference_steps=2,
                   output_type="np", generator=torch.Generator("cpu").manual_seed(0)).images  # fmt: skip
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    prompter.detach()


def test_derived_models_never_delete_what_they_did_not_write(tmp_path, capsys):
    """--out holding other files (or the base model itself) is refused before any training; a previous output of
    the same command is replaced, and only once the new one is complete."""
    from ipadapter.tinyworld.derived import main

    precious = tmp_path / "precious"
    (precious / "mydata").mkdir(parents=True)
    (precious / "mydata" / "notes.txt").write_text("important")
    assert main(["finetune", "--steps", "1", "--batch-size", "2", "--out", str(precious)]) == 2
    assert "already holds files that this command did not write (no finetune.json)" in capsys.readouterr().err
    assert main(["controlnet", "--steps", "1", "--batch-size", "2", "--out", str(precious)]) == 2
    assert (precious / "mydata" / "notes.txt").read_text() == "important"
    for bad in (["--steps", "0"], ["--restrict", "pattern=wavy"]):
        assert main(["finetune", *bad, "--out", str(tmp_path / "new")]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    tuned = finetune("tinyworld", tmp_path / "tuned", {"pattern": "striped"}, steps=1, batch_size=2, num_scenes=4)
    assert main(["finetune", "--base", str(tuned), "--out", str(tuned), "--steps", "1"]) == 2
    assert "is the base model's folder" in capsys.readouterr().err
    again = finetune("tinyworld", tuned, {"pattern": "striped"}, steps=1, batch_size=2, num_scenes=4, seed=1)
    assert (again / "image_encoder").is_dir() and not (tmp_path / ".tuned.partial").exists()
