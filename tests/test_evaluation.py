"""Evaluation: metric code on cases with known answers, the paper's CLIP protocol end to end (resumable), the
tiny-world CP/PF command, and clear errors for missing models."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tiny_models import free_port

from ipadapter.cli import main
from ipadapter.evaluation.clip_score import ClipScorer, clipscore
from ipadapter.evaluation.faces import fid, identity_similarity, lpips
from ipadapter.tinyworld.world import Scene, render


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer.from_pretrained("tinyworld")


def _scene(**kw):
    base = dict(shape="circle", color="red", pattern="solid", background="black", size="large", position="center")
    return Scene(**{**base, **kw})


def test_identical_images_score_clip_i_one_and_captions_rank_by_content(scorer):
    image = render(_scene())
    assert scorer.clip_i([image], image).item() == pytest.approx(1.0, abs=1e-5)
    other = render(_scene(color="blue", background="white"))
    assert scorer.clip_i([other], image).item() < 0.99
    right, wrong = scorer.clip_t([image, image], ["a red shape on a black background", "a blue shape on a white background"])
    assert right > wrong
    assert clipscore(torch.tensor([0.3, -0.2])).tolist() == pytest.approx([0.75, 0.0])


def test_missing_scoring_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a CLIP model folder: config.json missing"):
        ClipScorer.from_pretrained(tmp_path)


def test_scoring_clip_must_have_both_towers(tmp_path):
    """An image encoder (one tower) is refused by its config, and a CLIP file missing a tower by its weights
    (transformers filled the text tower with random weights: CLIP-T meaningless, a log line the only sign)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ipadapter.sources import TINYWORLD_DIR

    with pytest.raises(ValueError, match="is a 'clip_vision_model' model; the scoring CLIP needs both towers"):
        ClipScorer.from_pretrained(TINYWORLD_DIR / "sd" / "image_encoder")
    shutil.copytree(TINYWORLD_DIR / "clip", tmp_path / "clip")
    [weights] = (tmp_path / "clip").glob("*.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("text_model.")}, weights)
    with pytest.raises(ValueError, match=r"is not a complete CLIP model \(both towers\): \d+ weights missing, such "
                                         r"as \['text_model\."):  # fmt: skip
        ClipScorer.from_pretrained(tmp_path / "clip")


def test_eval_clip_samples_with_ddim_without_a_safety_checker(tmp_path, monkeypatch):
    """The paper's protocol samples with DDIM, and SD1.5's folder ships PNDM and diffusers' safety checker, which
    blackens the images it flags (and eval scored them so): a base with both is evaluated with DDIM and without the
    checker. A run that failed before its first pair recorded its settings only; the corrected run replaces them."""
    import numpy as np
    from diffusers import DDIMScheduler, PNDMScheduler
    from PIL import Image

    import ipadapter.sources

    class FlagsEverything(torch.nn.Module):  # what diffusers' checker does to a flagged image: zeros
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        device = property(lambda self: self.w.device)
        dtype = property(lambda self: self.w.dtype)

        def forward(self, images, clip_input):
            return np.zeros_like(images), [True] * len(images)

    from transformers import CLIPImageProcessor

    real, pipes = ipadapter.sources.load_pipeline, []

    def as_sd15(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.register_modules(safety_checker=FlagsEverything(), feature_extractor=CLIPImageProcessor())
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
        pipes.append(pipe)
        return pipe

    monkeypatch.setattr(ipadapter.sources, "load_pipeline", as_sd15)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"data": "tinyworld:1:7", "scale": 0.5}))  # a failed earlier run's
    assert main(["eval", "clip", "--data", "tinyworld:1:7", "--images-per-pair", "1", "--steps", "2", "--save-images",
                 "--out", str(out)]) == 0  # fmt: skip
    [pipe] = pipes
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.safety_checker is None
    assert np.asarray(Image.open(out / "images" / "000000-0.png")).max() > 0  # not blackened
    assert json.loads((out / "run.json").read_text())["scheduler"] == "ddim"
    assert "sampler: DDIM" in (out / "summary.md").read_text()


def test_eval_clip_runs_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", "clip", "--data", "tinyworld:3:7", "--images-per-pair", "2", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 3 and -1 <= summary["clip_i"] <= 1 and summary["images_per_pair"] == 2
    assert "| 3 |" in (out / "summary.md").read_text()
    part = out / "results.rank0.jsonl"
    lines = part.read_text().splitlines()
    assert len(lines) == 3 and all(len(json.loads(line)["per_image_clip_i"]) == 2 for line in lines)
    part.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # a kill cut the last line
    assert main(args) == 0
    lines_after = [json.loads(line) for line in part.read_text().splitlines()]
    assert [item["index"] for item in lines_after] == [0, 1, 2]  # only the cut pair was redone, the same way
    assert lines_after[2]["per_image_clip_i"] == json.loads(lines[2])["per_image_clip_i"]
    # another configuration into the same folder would mix its pairs with these: refused, naming what differs
    assert main([*args, "--scale", "0.5"]) == 2
    assert "holds results of another evaluation (scale: 1.0 there, 0.5 now)" in capsys.readouterr().err
    assert main([*args, "--limit", "2"]) == 0  # a shorter run over the same pairs summarises its own pairs only
    assert json.loads((out / "summary.json").read_text())["pairs"] == 2
    mine = tmp_path / "notes"  # a folder of the user's: its summary.md would be replaced
    mine.mkdir()
    (mine / "summary.md").write_text("my notes")
    assert main([*args[:-1], str(mine)]) == 2
    assert "holds other files (summary.md); expected a new or empty folder" in capsys.readouterr().err
    assert (mine / "summary.md").read_text() == "my notes" and sorted(p.name for p in mine.iterdir()) == ["summary.md"]


def test_eval_clip_on_a_single_file_base_with_its_configs_scores_as_the_folder(tmp_path, capsys, monkeypatch):
    """A community model as one original-layout file: --base-config names its configs (needed offline), as for
    `generate`; the scores are the folder's (the same weights)."""
    from ldm_format import save_ldm_checkpoint

    from ipadapter.sources import TINYWORLD_DIR

    folder = str(TINYWORLD_DIR / "sd")
    single = save_ldm_checkpoint(folder, tmp_path / "model.safetensors")
    args = ["eval", "clip", "--data", "tinyworld:2:7", "--images-per-pair", "1", "--steps", "2",
            "--image-encoder", f"{folder}/image_encoder"]  # fmt: skip
    assert main([*args, "--base", folder, "--out", str(tmp_path / "folder")]) == 0
    assert main([*args, "--base", str(single), "--base-config", folder, "--out", str(tmp_path / "file")]) == 0

    def scores(name):
        return json.loads((tmp_path / name / "summary.json").read_text())["clip_i"]

    assert scores("file") == pytest.approx(scores("folder"), abs=1e-3)
    assert main([*args, "--base", folder, "--base-config", folder, "--out", str(tmp_path / "x")]) == 2
    assert "--base-config goes with a single-file --base" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*args, "--base", str(single), "--clip", str(TINYWORLD_DIR / "clip"), "--out", str(tmp_path / "y")]) == 2
    # (offline: no configs to fetch; the scoring CLIP named, as for any base the tiny world's configs do not describe)
    assert "pass --base-config with the diffusers folder" in capsys.readouterr().err


COUNTED_GRAPHS: list = []  # what `_counting_backend` was given


def _counting_backend(graph, example_inputs):
    """A torch.compile backend that records each graph dynamo captures and runs it as traced."""
    COUNTED_GRAPHS.append(graph)
    return graph.forward


def test_eval_clip_with_a_compiled_unet_gives_the_same_scores(tmp_path, capsys):
    """--compile: the UNet through torch.compile (here a registered backend that counts dynamo's graphs and runs
    them as traced: inductor's capture without its C++ compilation) scores every image as the eager run does, with
    one graph for every step of every pair; an unknown backend is named before any model loads."""
    from torch._dynamo import list_backends, register_backend

    if "ipadapter_test_counting" not in list_backends(exclude_tags=()):
        register_backend(_counting_backend, name="ipadapter_test_counting")
    graphs = COUNTED_GRAPHS
    graphs.clear()
    args = ["eval", "clip", "--data", "tinyworld:2:7", "--images-per-pair", "2", "--steps", "2"]
    torch._dynamo.reset()
    try:
        assert main([*args, "--out", str(tmp_path / "eager")]) == 0
        assert main([*args, "--out", str(tmp_path / "compiled"), "--compile", "ipadapter_test_counting"]) == 0
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1  # two pairs x two steps, one graph

    def scores(name):
        return [json.loads(line)["per_image_clip_i"] for line in (tmp_path / name / "results.rank0.jsonl").read_text().splitlines()]

    assert len(scores("compiled")) == 2
    assert torch.allclose(torch.tensor(scores("compiled")), torch.tensor(scores("eager")), atol=1e-5)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bad"), "--compile", "inductr"]) != 0
    assert "--compile must be a torch.compile backend (" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_eval_clip_counts_unreadable_references_and_fails_when_none_is_left(tmp_path, capsys):
    render(_scene()).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    pairs = [{"image_file": "ok.png", "text": "a red circle"}, {"image_file": "broken.png", "text": "x"},
             {"image_file": "missing.png", "text": "y"}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    args = ["eval", "clip", "--data", str(tmp_path / "pairs.json"), "--image-root", str(tmp_path), "--images-per-pair",
            "1", "--steps", "2"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["skipped"] == 2
    assert "2 pair(s) skipped: reference image missing or unreadable" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps(pairs[1:]))
    assert main([*args[:2], "--data", str(tmp_path / "bad.json"), *args[4:], "--out", str(tmp_path / "b")]) == 2
    assert "error: no pair of" in capsys.readouterr().err
    # a wrong --image-root: named before any model loads, and nothing recorded that would refuse the corrected run
    assert main([*args[:4], "--image-root", str(tmp_path / "wrong"), *args[6:], "--out", str(tmp_path / "c")]) == 2
    assert "none of the 3 reference images of" in capsys.readouterr().err and not (tmp_path / "c").exists()
    render(_scene()).save(tmp_path / "missing.png")  # the missing reference arrives: the rerun evaluates it
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (summary["pairs"], summary["skipped"]) == (2, 1)
    capsys.readouterr()


def test_pairs_without_a_caption_get_clip_i_and_no_clip_t(tmp_path, capsys):
    """CLIP-T against an empty caption is a number (and a high one): such pairs count for CLIP-I only."""
    render(_scene()).save(tmp_path / "a.png")
    (tmp_path / "pairs.json").write_text(json.dumps([{"image_file": "a.png", "text": ""}]))
    assert main(["eval", "clip", "--data", str(tmp_path / "pairs.json"), "--images-per-pair", "1", "--steps", "2",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pairs"] == 1 and summary["clip_i"] is not None
    assert (summary["captioned"], summary["clip_t"], summary["clipscore"]) == (0, None, None)
    assert "CLIP-T and CLIPScore over the 0 pair(s) with a caption; 1 have none" in capsys.readouterr().out


def test_eval_tinyworld_prints_cp_pf_rows(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert main(["eval", "tinyworld", "--protocol", "image", "image+text", "--scale", "0", "1", "--n", "4",
                 "--steps", "2", "--preset", "style", "--out", str(out)]) == 0  # fmt: skip
    table = out.read_text()
    assert table.count("| image | ") == 2 and table.count("| image+text | ") == 2 and "preset style" in table


def test_eval_bad_inputs_are_named_before_any_model_loads(tmp_path, capsys, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr("ipadapter.evaluation.clip_score.ClipScorer.from_pretrained", no_models)
    monkeypatch.setattr("ipadapter.sources.load_pipeline", no_models)
    monkeypatch.setattr("ipadapter.tinyworld.evaluate.load_tinyworld", no_models)
    monkeypatch.chdir(tmp_path)  # (the default --out is ./eval-clip)
    (tmp_path / "file").write_text("x")
    (tmp_path / "shards.tar").write_bytes(b"")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")  # a pipeline folder of another model
    from transformers import CLIPVisionConfig

    from ipadapter.sources import TINYWORLD_DIR

    CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=40, num_hidden_layers=1,
                     num_attention_heads=2, image_size=32, patch_size=8).save_pretrained(tmp_path / "enc40")  # fmt: skip
    render(_scene()).save(tmp_path / "r.png")
    from diffusers import UNet2DConditionModel

    from ipadapter import IPAdapter

    unet = UNet2DConditionModel.from_pretrained(TINYWORLD_DIR / "sd", subfolder="unet")
    IPAdapter.for_unet(unet, "faceid_plusv2", image_embed_dim=64).save(tmp_path / "ip-adapter-faceid-plusv2.safetensors")
    cases = [
        (["clip", "--limit", "-1"], "limit must be >= 0, found -1"),  # was read as "all but the last pair"
        (["clip", "--scheduler", "euler"], "unknown scheduler 'euler'; expected one of ddim, pipeline"),
        (["clip", "--clip", str(tmp_path / "noclip")], "--clip " + str(tmp_path / "noclip") + ": not found"),
        (["clip", "--image-encoder", str(tmp_path / "noenc")], "--image-encoder " + str(tmp_path / "noenc")),
        # the base's encoder would have been found only after the base and the adapter had loaded, and the run's
        # folder then refused the corrected run
        (["clip", "--image-encoder", str(tmp_path / "enc40")],
         "image encoder mismatch: this adapter (base) expects 64-d pooled features"),
        (["clip", "--base", str(tmp_path / "sd")], "--clip: the tiny world's scoring CLIP (64 px, trained on its "
                                                   "shapes) cannot score images of " + str(tmp_path / "sd")),
        (["clip", "--base", str(tmp_path / "sd"), "--clip", str(TINYWORLD_DIR / "clip")],
         "this adapter (base) needs"),  # no image_encoder/ in or beside that base
        (["clip", "--data", str(tmp_path / "shards.tar")],
         "unsupported --data pairs " + str(tmp_path / "shards.tar") + ": expected .json, .jsonl, a folder of images, "
         "or tinyworld:N:SEED (WebDataset .tar shards are read by training only)"),
        (["clip", "--adapter", str(tmp_path / "ip-adapter-faceid-plusv2.safetensors")],
         "ip-adapter-faceid-plusv2.safetensors (faceid_plusv2) is a FaceID adapter, prompted with face embeddings"),
        (["face", "--reference", str(tmp_path / "r.png"), "--generated", str(tmp_path / "r.png"), "--no-identity"],
         "--no-identity leaves nothing to measure: add --fid-real and / or --lpips"),
        (["clip", "--scale", "nan"], "scale must be a finite number, found nan"),
        (["clip", "--preset", "nosuch"], "unknown preset 'nosuch'; expected one of"),
        (["clip", "--adapter", str(tmp_path / "missing.safetensors")], "adapter not found"),
        (["clip", "--out", str(tmp_path / "file")], "is a file; expected a folder"),
        (["tinyworld", "--adapter", str(tmp_path / "missing.safetensors")], "adapter not found"),
        (["tinyworld", "--preset", "nosuch"], "unknown --preset 'nosuch'"),
        (["tinyworld", "--n", "0"], "--n must be >= 1, found 0"),
        (["tinyworld", "--scale", "0.5", "nan"], "--scale must be finite numbers, found 0.5 nan"),
        (["tinyworld", "--out", str(tmp_path)], "is a folder; expected a file"),  # was an error after the whole run
    ]
    for args, message in cases:
        assert main(["eval", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "eval-clip").exists() and not any(tmp_path.glob("**/run.json"))  # nothing recorded


class _FakeEmbedder:
    """Embeds an image as its mean colour (a 'face' when not all black)."""

    def embed(self, image):
        pixels = torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32).mean(0)
        if pixels.sum() == 0:
            raise ValueError("no face detected")
        return pixels


def test_identity_similarity_known_answers():
    from PIL import Image

    red, blue, black = (Image.new("RGB", (8, 8), c) for c in ((200, 0, 0), (0, 0, 200), (0, 0, 0)))
    scores = identity_similarity(_FakeEmbedder(), [red, blue, black], red)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(0.0) and scores[2] is None


def test_fid_and_lpips_say_what_is_missing(monkeypatch):
    from PIL import Image

    monkeypatch.setitem(sys.modules, "torchmetrics", None)
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ImportError, match=r"FID needs torchmetrics: `pip install torchmetrics\[image\]`"):
        fid([image, image], [image, image])
    with pytest.raises(ValueError, match="expected at least 2 images in each, found 1 real and 2 generated"):
        fid([image], [image, image])  # no covariance from one image: said before any model loads
    with pytest.raises(ImportError, match="LPIPS needs torchmetrics"):
        lpips([image], [image])


def test_lpips_compares_each_image_with_the_reference_at_its_size(monkeypatch):
    """A 96x64 generated image against a 64x64 reference: the reference is resized to 96x64 (it used to be squashed
    to 96x96 beside an unresized image, shapes that cannot be compared)."""
    import types

    from PIL import Image

    seen = []

    class Metric:
        def __init__(self, **kwargs):
            pass

        def __call__(self, x, y):
            seen.append((tuple(x.shape), tuple(y.shape)))
            return torch.tensor(0.5)

    module = types.ModuleType("torchmetrics.image.lpip")
    module.LearnedPerceptualImagePatchSimilarity = Metric
    monkeypatch.setitem(sys.modules, "torchmetrics", types.ModuleType("torchmetrics"))
    monkeypatch.setitem(sys.modules, "torchmetrics.image", types.ModuleType("torchmetrics.image"))
    monkeypatch.setitem(sys.modules, "torchmetrics.image.lpip", module)
    generated = [Image.new("RGB", (96, 64)), Image.new("RGB", (96, 64))]
    assert lpips(generated, [Image.new("RGB", (64, 64))] * 2) == 0.5
    assert seen == [((2, 3, 64, 96), (2, 3, 64, 96))]


def test_eval_clip_shards_pairs_over_two_processes(tmp_path):
    import os
    import subprocess

    # `accelerate launch --cpu --num_processes 2` starts one process (accelerate 1.15); torchrun starts two
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ipadapter.cli", "eval", "clip",
           "--data", "tinyworld:5:3", "--images-per-pair", "1", "--steps", "2", "--out", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [[json.loads(line)["index"] for line in (tmp_path / f"results.rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]  # fmt: skip
    assert ranks == [[0, 2, 4], [1, 3]]
    assert json.loads((tmp_path / "summary.json").read_text())["pairs"] == 5
