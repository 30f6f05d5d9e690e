"""The tiny-world build at smoke scale: every stage's outputs, skipping, exact resume after a kill, and the
assembled folder loading in diffusers / transformers and generating."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter.tinyworld import stack
from ipadapter.tinyworld.build import (
    PIPELINE_FOLDER,
    STAGES,
    STOPPED_EARLY,
    CaptionSampler,
    CaptionTokens,
    SceneIndex,
    apply_overrides,
    consistent,
    main,
    min_snr_weights,
    scene_indices,
    SCALES,
)
from ipadapter.tinyworld.world import ATTRIBUTES, Scene, caption, sample_scene, vocabulary

SMOKE = ["--scale", "smoke", "--device", "cpu"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tinyworld")
    assert main(["--out", str(out), *SMOKE]) == 0
    return out


def done(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "done.json").read_text())


def test_every_stage_writes_its_outputs_and_check(built):
    for stage in STAGES:
        record = done(built, stage)
        assert record["stage"] == stage and record["scale"] == "smoke" and "check" in record
        assert not (built / stage / "checkpoint.pt").exists()  # removed once done
    tokenizer = done(built, "tokenizer")["check"]
    assert tokenizer["longest_caption_tokens"] <= tokenizer["model_max_length"] == 16

    clip = done(built, "clip")
    assert clip["steps"] == 4 and clip["check"]["reload_max_abs_diff"] == 0.0
    for key in ("t2i_r_precision", "zero_shot_accuracy", "probe_accuracy_hidden_states_-2"):
        assert set(clip["check"][key]) == set(ATTRIBUTES) and all(0 <= v <= 1 for v in clip["check"][key].values())
    assert (built / "clip" / "image_encoder" / "preprocessor_config.json").is_file()

    vae = done(built, "vae")
    saved = json.loads((built / "vae" / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == pytest.approx(vae["check"]["scaling_factor"]) and saved["scaling_factor"] > 0
    assert vae["check"]["psnr"] > 0 and (built / "vae" / "reconstructions.png").is_file()

    unet = done(built, "unet")
    assert unet["steps"] == 4 and (built / "unet" / "samples.png").is_file()
    assert len((built / "unet" / "samples.txt").read_text().splitlines()) == unet["check"]["samples"] == 4

    adapters = done(built, "adapters")
    assert {v: t["steps"] for v, t in adapters["training"].items()} == {"base": 3, "plus": 4}  # variant_steps
    assert set(adapters["check"]) == {"base", "plus"}

    assemble = done(built, "assemble")["check"]
    assert assemble["total_weight_bytes"] < 25e6
    assert assemble["torch_dtype_float32"]["image_size"] == [64, 64]
    assert assemble["no_torch_dtype"] == {"dtypes": {k: "torch.float32" for k in ("unet", "vae", "text_encoder")},
                                          "image_size": [64, 64]}  # fmt: skip
    assert assemble["text_encoder_max_abs_diff_vs_float32"] < 1e-2  # float16 rounding, not random weights


def test_rerun_skips_finished_stages(built, caplog):
    stamps = {stage: (built / stage / "done.json").stat().st_mtime_ns for stage in STAGES}
    with caplog.at_level(logging.INFO, logger="ipadapter.tinyworld.build"):
        assert main(["--out", str(built), *SMOKE]) == 0
    assert {stage: (built / stage / "done.json").stat().st_mtime_ns for stage in STAGES} == stamps
    assert sum("skipped" in r.getMessage() for r in caplog.records) == len(STAGES)


def test_adapters_rerun_keeps_trained_adapters_and_their_training_records(built, tmp_path):
    # e.g. a later build that retrains one variant: the other's adapter and training record are kept, not lost
    for part in ("data", "assemble", "adapters"):
        shutil.copytree(built / part, tmp_path / part)
    (tmp_path / "adapters" / "done.json").unlink()
    shutil.rmtree(tmp_path / "adapters" / "plus")
    assert main(["--out", str(tmp_path), *SMOKE, "--stages", "adapters"]) == 0
    before, after = done(built, "adapters")["training"], done(tmp_path, "adapters")["training"]
    assert after["base"] == before["base"] and after["plus"]["steps"] == 4
    base = (built / "adapters" / "base" / "base.safetensors").read_bytes()
    assert (tmp_path / "adapters" / "base" / "base.safetensors").read_bytes() == base


def test_a_killed_stage_resumes_from_its_checkpoint_exactly(built, tmp_path):
    for part in ("data", "tokenizer", "clip", "vae"):
        shutil.copytree(built / part, tmp_path / part)
    argv = ["--out", str(tmp_path), *SMOKE, "--stages", "unet"]

    assert main([*argv, "--stop-after", "2"]) == STOPPED_EARLY
    assert not (tmp_path / "unet" / "done.json").exists()
    assert torch.load(tmp_path / "unet" / "checkpoint.pt", weights_only=True)["step"] == 2

    assert main(argv) == 0
    assert done(tmp_path, "unet")["resumed_from"] == 2
    weights = "unet/unet/diffusion_pytorch_model.safetensors"
    resumed, uninterrupted = load_file(tmp_path / weights), load_file(built / weights)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_a_finished_stage_refuses_another_config(built):
    with pytest.raises(ValueError, match="different config"):
        main(["--out", str(built), *SMOKE, "--stages", "unet", "--set", "unet.steps=5"])


def test_missing_prerequisite_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing \['tokenizer', 'clip', 'vae'\]"):
        main(["--out", str(tmp_path), *SMOKE, "--stages", "unet"])


def test_assembled_folder_loads_and_generates(built):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer, CLIPVisionModelWithProjection

    folder = built / "assemble" / PIPELINE_FOLDER
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    if os.name == "posix":  # every user may read the weights (save_pretrained's safetensors writes them 0600)
        umask = os.umask(0)
        os.umask(umask)
        assert {p.stat().st_mode & 0o777 for p in folder.rglob("*.safetensors")} == {0o666 & ~umask}

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle", "a large blue star on the left"], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (2, 64, 64, 3) and float(images.std()) > 0

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert all(len(tokenizer(word).input_ids) == 3 for word in vocabulary())  # BOS, the word, EOS

    encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(folder / "image_encoder")
    pixels = processor(images=[images[0]], return_tensors="pt").pixel_values
    out = encoder(pixel_values=pixels, output_hidden_states=True)
    assert pixels.shape == (1, 3, 64, 64)
    assert out.image_embeds.shape == (1, 64) and out.hidden_states[-2].shape == (1, 65, 128)


def test_every_world_word_is_one_bpe_token():
    merges = stack.learn_merges(vocabulary())
    tokenizer = stack.build_tokenizer(stack.TokenizerConfig())
    assert len(merges) == len(set(merges))
    assert [tokenizer.tokenize(w) for w in ("red", "triangle")] == [["red</w>"], ["triangle</w>"]]
    assert tokenizer.tokenize("reddish") != ["reddish</w>"]  # unknown words fall back to smaller pieces


def test_partial_captions_match_every_image_with_the_stated_attributes():
    red_circle = scene_indices(Scene("circle", "red", "solid", "white", "small", "left"))
    red_square = scene_indices(Scene("square", "red", "solid", "white", "small", "left"))
    scenes = torch.tensor([red_circle, red_square])
    masks = torch.zeros(2, len(ATTRIBUTES), dtype=torch.bool)
    masks[0, 1] = True  # caption 0: "a red shape"
    masks[1, 0] = True  # caption 1: "a square"
    assert consistent(scenes, masks).tolist() == [[True, True], [False, True]]

    tokenizer = stack.build_tokenizer(stack.TokenizerConfig())
    ids = CaptionTokens(tokenizer).ids(scenes, masks)
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == ["a red shape", "a square"]
    sampler = CaptionSampler(full_prob=0.0, attribute_prob=0.5, dropout=0.0, allow_empty=False)
    assert sampler.masks(500, torch.Generator().manual_seed(0)).any(1).all()  # never empty when not allowed


def test_caption_token_tables_equal_tokenized_world_captions():
    tokenizer = stack.build_tokenizer(stack.TokenizerConfig())
    tokens = CaptionTokens(tokenizer, check=0)
    rng = random.Random(1)
    scenes = [sample_scene(rng) for _ in range(64)]
    masks = torch.tensor([[subset >> a & 1 for a in range(len(ATTRIBUTES))] for subset in range(64)], dtype=torch.bool)
    texts = [caption(s, [a for a, m in zip(ATTRIBUTES, row) if m]) for s, row in zip(scenes, masks)]
    expected = tokenizer(texts, padding="max_length", max_length=16).input_ids
    assert tokens.ids(torch.tensor([scene_indices(s) for s in scenes]), masks).tolist() == expected


def test_overrides_are_typed_and_checked():
    config = apply_overrides(SCALES["smoke"]("cpu"), ["unet.batch_size=4", "stack.unet.block_out_channels=[64,128,128]"])
    assert config.unet.batch_size == 4 and config.stack.unet.block_out_channels == (64, 128, 128)
    with pytest.raises(ValueError, match="unknown config field 'batchsize'"):
        apply_overrides(SCALES["smoke"]("cpu"), ["unet.batchsize=4"])
    config = apply_overrides(SCALES["smoke"]("cpu"), ['adapters.variant_steps={"plus": 9}'])
    assert config.adapters.variant_steps == {"plus": 9}
    with pytest.raises(ValueError, match="positive step counts; found {'plus': 0}"):
        apply_overrides(SCALES["smoke"]("cpu"), ['adapters.variant_steps={"plus": 0}'])
    # a bare name is a one-name list (it was split into letters, found only at the last stage, hours later)
    assert apply_overrides(SCALES["smoke"]("cpu"), ["adapters.variants=base"]).adapters.variants == ("base",)
    assert apply_overrides(SCALES["smoke"]("cpu"), ["adapters.variants=base,plus"]).adapters.variants == ("base", "plus")
    for bad, message in (("adapters.variants=bse", r"unknown variant 'bse'"),
                         ("unet.steps=abc", r"unet.steps expects a number \(int\), found 'abc'"),
                         ("unet.steps=2.5", r"unet.steps expects a whole number, found '2.5'"),
                         ("seed=5", r"seed is set with --seed")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            apply_overrides(SCALES["smoke"]("cpu"), [bad])


def test_contrast_groups_differ_from_their_anchor_in_the_contrasted_attribute_only():
    generator = torch.Generator().manual_seed(0)
    sizes = [len(values) for values in ATTRIBUTES.values()]
    scenes = torch.stack([torch.randint(0, n, (20_000,), generator=generator) for n in sizes], 1)  # (n, 6)
    index, attribute = SceneIndex(scenes).groups(130, 4, generator)
    assert index.shape == attribute.shape == (130,)  # 32 groups of 4, then 2 random images
    groups = scenes[index[:128]].view(32, 4, 6)
    differs = groups != groups[:, :1]  # (32, 4, 6)
    contrasted = attribute[:128].view(32, 4)
    assert (contrasted == contrasted[:, :1]).all()
    one_hot = torch.nn.functional.one_hot(contrasted[:, 0], 6).bool()[:, None, :].expand(-1, 3, -1)  # (32, 3, 6)
    exact = (differs[:, 1:] == one_hot).all(-1)  # (32, 3): differs exactly in the contrasted attribute
    assert exact.float().mean() > 0.9  # the rest are fallbacks where no image of the wanted scene exists


def test_min_snr_weights_cap_the_loss_of_low_noise_timesteps():
    scheduler = stack.build_train_scheduler(SCALES["smoke"]("cpu").stack.scheduler)
    alphas = scheduler.alphas_cumprod  # (T,), decreasing: t = 0 is nearly clean
    snr = alphas / (1 - alphas)
    weights = min_snr_weights(alphas, 5.0)
    noisy = snr <= 5
    assert noisy.any() and (~noisy).any()
    assert torch.equal(weights[noisy], torch.ones(int(noisy.sum())))  # as plain MSE where SNR <= gamma
    assert torch.allclose(weights[~noisy] * snr[~noisy], torch.full((int((~noisy).sum()),), 5.0))
    assert weights[0] < 0.01  # the cleanest step is weighted by gamma / SNR


def test_jobs_run_stages_side_by_side_in_child_processes(built, tmp_path, caplog, capfd):
    stages = ("tokenizer", "clip", "vae")
    with caplog.at_level(logging.INFO, logger="ipadapter.tinyworld.build"):
        assert main(["--out", str(tmp_path), *SMOKE, "--jobs", "2", "--threads", "2", "--stages", ",".join(stages)]) == 0
    started = [r.getMessage() for r in caplog.records if "child process" in r.getMessage()]
    # vae needs nothing, so it runs beside the tokenizer and then beside clip (the whole schedule: the test below)
    assert started == [f"{s}: starting in a child process with 1 thread(s)" for s in ("tokenizer", "vae", "clip")]
    for stage in stages:
        assert done(tmp_path, stage)["config"] == done(built, stage)["config"]  # the same build, stage by stage
    assert not list(tmp_path.rglob("*.tmp"))
    # a child's error stops the build with its status and message
    assert main(["--out", str(tmp_path / "empty"), *SMOKE, "--stages", "unet", "--jobs", "2"]) != 0
    assert "missing ['tokenizer', 'clip', 'vae']" in capfd.readouterr().err


def test_jobs_schedule_every_stage_after_what_it_reads_and_the_heavy_ones_alone(tmp_path, monkeypatch):
    """The whole build's schedule with --jobs 2 --threads 4, children simulated (each finishes after a few polls):
    never more than 2 at once, each with 2 threads; a stage starts only once every stage it reads is done; unet,
    assemble and adapters run alone with all 4 threads; a failing child stops what has not started."""
    import argparse

    from ipadapter.tinyworld import build

    def simulate(fail: str | None = None) -> tuple[int, list[tuple[str, int, set[str], set[str]]]]:
        out = tmp_path / f"sim-{fail}"
        ctx = build.Context(out=out, config=SCALES["smoke"]("cpu"), device=torch.device("cpu"), stop_after=None)
        log, running, finished = [], {}, set()
        durations = {"vae": 6, "clip": 3}  # polls until a child exits: the vae is slow

        class Child:
            def __init__(self, command, env):
                self.stage, self.polls = command[command.index("--stages") + 1], 0
                threads = int(command[command.index("--threads") + 1])
                assert env["OMP_NUM_THREADS"] == str(threads)
                log.append((self.stage, threads, set(running), set(finished)))
                running[self.stage] = self

            def poll(self):
                self.polls += 1
                if self.polls < durations.get(self.stage, 2):
                    return None
                del running[self.stage]
                if self.stage == fail:
                    return 7
                (out / self.stage).mkdir(parents=True, exist_ok=True)
                (out / self.stage / "done.json").write_text("{}")
                finished.add(self.stage)
                return 0

        monkeypatch.setattr(build.subprocess, "Popen", Child)
        monkeypatch.setattr(build.time, "sleep", lambda s: None)
        args = argparse.Namespace(scale="smoke", seed=0, recipe=None, overrides=[], stop_after=None)
        return build.run_side_by_side(ctx, args, build.STAGES, jobs=2, threads=4), log

    status, log = simulate()
    assert status == 0 and sorted(stage for stage, *_ in log) == sorted(build.STAGES)
    for stage, threads, beside, finished_before in log:
        assert set(build.REQUIRES[stage]) <= finished_before, stage  # what it reads is done
        assert len(beside) <= 1  # at most 2 at once
        solo = stage in ("unet", "assemble", "adapters")
        assert (threads, beside) == ((4, set()) if solo else (2, beside)), (stage, threads, beside)
        assert not beside & {"unet", "assemble", "adapters"}
    assert any(beside for *_, beside, _ in log)  # light stages did run side by side
    status, log = simulate(fail="clip")
    assert status == 7 and "unet" not in [stage for stage, *_ in log]  # nothing that needs clip was started


def test_command_line_bad_input_is_one_line(tmp_path, capsys):
    from ipadapter.tinyworld.build import cli

    for argv, message in ((["--stages", "foo"], "unknown stages ['foo']"), (["--threads", "0"], "--threads >= 1"),
                          (["--set", "unet.steps=abc"], "unet.steps expects a number"),
                          (["--stop-after", "0"], "--stop-after must be >= 1 (steps of this run), found 0"),
                          (["--stages", "tokenizer", "--ship", str(tmp_path / "ship")],  # before building anything
                           "--ship needs the finished stages assemble and adapters; ['assemble', 'adapters'] neither")):  # fmt: skip
        assert cli(["--out", str(tmp_path / "b"), "--scale", "smoke", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
