"""The trainer on a tiny SD model and tiny-world data: what changes, exact resume, safe checkpoints, data formats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import free_port, make_sd_folder, make_world_folder

from ipadapter import load_adapter
from ipadapter.training import TrainConfig, Trainer, train
from ipadapter.training.checkpointing import (
    list_checkpoints,
    load_training_state,
    resolve_resume,
)
from ipadapter.training.data import iter_webdataset, read_records
from ipadapter.training.loop import ignore_stop_signals as _ignore_stop_signals


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    base, encoder = make_sd_folder(root)
    data = make_world_folder(root / "data", 16)
    return {"base": base, "encoder": encoder, "data": data, "root": root}


@pytest.fixture(scope="module")
def compact_world(world, tmp_path_factory):
    """The same data and a 4-layer UNet, for the launcher and compiler tests: what they check does not depend on the
    depth, and starting processes and tracing graphs of 16 layers would cost minutes of the suite's budget."""
    root = tmp_path_factory.mktemp("compact")
    base, encoder = make_sd_folder(root, compact=True)
    return {**world, "base": base, "encoder": encoder, "root": root}


def _cfg(world, output, **kw) -> TrainConfig:
    defaults = dict(base=world["base"], image_encoder=world["encoder"], data=world["data"], resolution=16,
                    batch_size=4, max_steps=4, save_every=2, log_every=1, output=str(output))
    return TrainConfig(**{**defaults, **kw})


def _weights(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        out.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_only_the_adapter_learns(world, tmp_path, variant):
    frozen_before = {**_weights(world["base"]), **_weights(world["encoder"])}
    final = train(_cfg(world, tmp_path / "run", variant=variant), show_progress=False)
    frozen_after = {**_weights(world["base"]), **_weights(world["encoder"])}
    assert frozen_before.keys() == frozen_after.keys()
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    trained = load_adapter(final / "adapter.safetensors")
    assert trained.config.variant == variant
    # to_k_ip started as a copy of the UNet's to_k and moved away from it; the projection moved from its init.
    from diffusers import UNet2DConditionModel

    from ipadapter import IPAdapter

    unet = UNet2DConditionModel.from_pretrained(world["base"], subfolder="unet")
    fresh = IPAdapter.for_unet(unet, variant, image_embed_dim=trained.config.image_embed_dim)
    changed = [k for k, v in trained.state_dict().items() if k.startswith("layers.") and not torch.equal(v, fresh.state_dict()[k])]
    assert len(changed) == len([k for k in fresh.state_dict() if k.startswith("layers.")])
    state = torch.load(final / "training_state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(p).all() for p in trained.parameters())


def test_a_diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoints_finite(world, tmp_path):
    # lr 1e30: the first update makes the weights huge, the next forward overflows. Losses are checked at logs and
    # saves (not every step), and no checkpoint is written once a loss or a weight is non-finite.
    cfg = _cfg(world, tmp_path / "run", learning_rate=1e30, max_steps=8, save_every=1, log_every=4)
    with pytest.raises(FloatingPointError, match=r"at step \d+; lower --learning-rate"):
        train(cfg, show_progress=False)
    saved = list_checkpoints(tmp_path / "run")
    assert len(saved) < 8  # it stopped
    for checkpoint in saved:
        assert all(torch.isfinite(p).all() for p in load_adapter(checkpoint / "adapter.safetensors").parameters())


def test_resume_refuses_what_does_not_fit_and_names_the_checkpoint_to_use(world, tmp_path):
    train(_cfg(world, tmp_path / "run", max_steps=2, save_every=1), show_progress=False)
    with pytest.raises(ValueError, match=r"trained as another adapter \(variant: 'base' there, 'plus' now\)"):
        train(_cfg(world, tmp_path / "run", resume="latest", variant="plus"), show_progress=False)
    with pytest.raises(ValueError, match=r"its adapter does not fit this run's model \(base 'tinyworld'"):
        train(_cfg(world, tmp_path / "run", resume="latest", base="tinyworld"), show_progress=False)
    first, latest = list_checkpoints(tmp_path / "run")
    (latest / "adapter.safetensors").write_bytes(b"\0" * 64)  # a disk error after the save
    with pytest.raises(ValueError, match=rf"not a readable safetensors file.*the previous checkpoint is .*{first.name}"):
        train(_cfg(world, tmp_path / "run", resume="latest"), show_progress=False)
    final = train(_cfg(world, tmp_path / "run", resume=str(first)), show_progress=False)
    assert final.name == "checkpoint-4"
    # another run's checkpoint into this run's folder would prune its checkpoints (--keep-last): refused
    other = train(_cfg(world, tmp_path / "other", max_steps=1, save_every=1), show_progress=False)
    held = list_checkpoints(tmp_path / "run")
    with pytest.raises(ValueError, match=r"is another run's checkpoint and --output .*run holds this run's checkpoints"):
        train(_cfg(world, tmp_path / "run", resume=str(other), max_steps=3), show_progress=False)
    assert list_checkpoints(tmp_path / "run") == held
    from ipadapter.training.checkpointing import check_resumable

    check_resumable(first, {"variant": "base"})
    (first / "train_config.json").write_text(json.dumps({"variant": "plus"}))
    check_resumable(first, {"variant": "sd15_plus"})  # another name for the same architecture
    with pytest.raises(ValueError, match="trained as another adapter"):
        check_resumable(first, {"variant": "sd15"})


def test_resuming_an_earlier_checkpoint_follows_the_new_course_and_keeps_the_old_one_aside(world, tmp_path):
    """Resuming from checkpoint-2 of a run that reached 4, keeping the last 1: pruning by step number would delete
    the new checkpoint-3 in favour of the old course's checkpoint-4 (and `--resume latest` would pick that)."""
    run = tmp_path / "run"
    train(_cfg(world, run, max_steps=4, save_every=1, keep_last=0), show_progress=False)
    final = train(_cfg(world, run, max_steps=3, save_every=1, keep_last=1, resume=str(run / "checkpoint-2")),
                  show_progress=False)  # fmt: skip
    assert list_checkpoints(run) == [final] == [run / "checkpoint-3"]
    assert resolve_resume(run, "latest") == final
    assert (run / "superseded-2-checkpoint-3" / "adapter.safetensors").is_file()  # the old course: kept, not deleted
    assert (run / "superseded-2-checkpoint-4" / "adapter.safetensors").is_file()
    (final / "training_state.pt").write_bytes(b"PK\x03\x04 not a zip")  # a disk error after the save
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-3: training_state.pt is damaged"):
        train(_cfg(world, run, max_steps=4, resume="latest"), show_progress=False)


def test_resume_is_exact(world, tmp_path):
    straight = train(_cfg(world, tmp_path / "a", max_steps=4), show_progress=False)
    train(_cfg(world, tmp_path / "b", max_steps=2), show_progress=False)
    resumed = train(_cfg(world, tmp_path / "b", max_steps=4, resume="latest"), show_progress=False)
    a = load_file(str(straight / "adapter.safetensors"))
    b = load_file(str(resumed / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume latest"):
        train(_cfg(world, tmp_path / "b", max_steps=6), show_progress=False)


def _marking_worker_init(worker_id: int) -> None:
    """The trainer's worker_init_fn, leaving one line per worker process started (a module-level function: workers
    started by spawn or forkserver import it by name)."""
    _ignore_stop_signals(worker_id)
    with open(os.environ["IPADAPTER_TEST_WORKER_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")


def test_loader_workers_start_once_per_run_and_an_epochs_end_resumes_exactly(world, tmp_path, monkeypatch):
    """16 samples in batches of 4: 10 steps are 2.5 epochs. The workers start once (a loader per epoch restarted
    them at every epoch: with short epochs and 8 workers a fifth of a step's time on a GPU), and the data order,
    epoch and position are the per-epoch ones: a run resumed from step 4, the end of the first epoch, ends with the
    straight run's adapter."""
    log = tmp_path / "workers.log"
    monkeypatch.setenv("IPADAPTER_TEST_WORKER_LOG", str(log))
    monkeypatch.setattr("ipadapter.training.loop.ignore_stop_signals", _marking_worker_init)
    straight = train(_cfg(world, tmp_path / "a", max_steps=10, save_every=100, num_workers=2), show_progress=False)
    assert len(log.read_text().split()) == 2
    state = load_training_state(straight)
    assert (state["epoch"], state["position"]) == (2, 8)
    first = train(_cfg(world, tmp_path / "b", max_steps=4, num_workers=2), show_progress=False)
    assert (load_training_state(first)["epoch"], load_training_state(first)["position"]) == (0, 16)
    resumed = train(_cfg(world, tmp_path / "b", max_steps=10, save_every=100, num_workers=2, resume="latest"),
                    show_progress=False)  # fmt: skip
    assert (load_training_state(resumed)["epoch"], load_training_state(resumed)["position"]) == (2, 8)
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_a_run_that_raises_ends_its_loader_workers_and_its_process_exits(world, tmp_path):
    """An error escaping a run with loader workers (CUDA out of memory, a second Ctrl-C) left them running: the
    exception's traceback held the loop and its loader, and at exit Python's multiprocessing terminated the workers
    with SIGTERM, which they ignore (`ignore_stop_signals`), and waited for them for ever: the process hung."""
    child = f"""
from ipadapter.training import TrainConfig, Trainer, train
def out_of_memory(self):
    raise RuntimeError("out of memory")
Trainer.validate = out_of_memory
train(TrainConfig(base={world['base']!r}, image_encoder={world['encoder']!r}, data={world['data']!r}, resolution=16,
                  batch_size=4, max_steps=6, validate_every=2, num_workers=2, output={str(tmp_path / 'run')!r}),
      show_progress=False)
"""
    try:
        result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after the run raised (its loader workers were left running)")
    assert result.returncode == 1 and "RuntimeError: out of memory" in result.stderr


def test_a_resume_takes_new_rates_and_refuses_other_samples(world, tmp_path):
    """What may change on resume (learning rate, weight decay: they were restored from the checkpoint, silently) and
    what may not: other data, seed or resolution (the saved position counts into the run's own course of samples),
    or a --max-steps the checkpoint has reached. The same data moved elsewhere resumes."""
    import shutil

    from ipadapter.training.loop import Trainer

    data = Path(shutil.copytree(world["data"], tmp_path / "data"))
    run = tmp_path / "run"
    train(_cfg(world, run, data=str(data), max_steps=2, warmup_steps=4), show_progress=False)
    trainer = Trainer(_cfg(world, run, data=str(data), max_steps=3, warmup_steps=4, resume="latest",
                           learning_rate=5e-3, weight_decay=0.5), show_progress=False)  # fmt: skip
    trainer.setup()
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (5e-3 * 3 / 4, 0.5)  # the third step of a 4-step warm-up
    trainer.adapter.detach()
    moved = Path(shutil.move(str(data), tmp_path / "moved"))
    other = Path(make_world_folder(tmp_path / "other", 8, seed=3))
    recaptioned = Path(shutil.copytree(moved, tmp_path / "recaptioned"))
    next(iter(sorted(recaptioned.glob("*.txt")))).write_text("another caption")
    for changes, message in (({"data": str(other)}, r"trained on other data than --data .*other \(16 records there, "
                                                    r"8 now\).* --init-adapter .*checkpoint-2/adapter.safetensors"),
                             ({"data": str(recaptioned)}, r"\(the same number of records, other names, captions"),
                             ({"seed": 7}, r"made with other settings \(--seed: 0 there, 7 now\)"),
                             ({"resolution": 24}, r"--resolution: 16 there, 24 now"),
                             ({"max_steps": 2}, r"checkpoint-2 is at step 2, already at --max-steps 2: nothing to train"),
                             ({"image_root": str(tmp_path)}, r"--image-root is the folder of a JSON / JSONL list's "
                                                             r"image_file paths; --data .* is a folder of images")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            train(_cfg(world, run, **{"data": str(moved), "max_steps": 3, "resume": "latest", **changes}),
                  show_progress=False)  # fmt: skip
    assert [c.name for c in list_checkpoints(run)] == ["checkpoint-2"]  # nothing rewritten
    final = train(_cfg(world, run, data=str(moved), max_steps=3, resume="latest"), show_progress=False)
    assert final.name == "checkpoint-3"


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(world, tmp_path):
    first = train(_cfg(world, tmp_path / "run", max_steps=2), show_progress=False)
    child = f"""
import sys, time, torch
from ipadapter import load_adapter
from ipadapter.training.checkpointing import save_checkpoint
adapter = load_adapter({str(first / 'adapter.safetensors')!r})
slow_save = torch.save
def stalled(obj, path, *a, **k):
    slow_save(obj, path, *a, **k)
    print("saving", flush=True)
    time.sleep(60)
torch.save = stalled
save_checkpoint({str(tmp_path / 'run')!r}, 3, adapter, {{"step": 3}}, "{{}}", keep_last=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"  # mid-save: the new checkpoint is half written
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(tmp_path / "run") == [first]
    assert resolve_resume(tmp_path / "run", "latest") == first
    load_adapter(first / "adapter.safetensors")  # intact and loadable
    final = train(_cfg(world, tmp_path / "run", max_steps=3, resume="latest"), show_progress=False)
    assert final.name == "checkpoint-3" and list_checkpoints(tmp_path / "run")[-1] == final


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_with_a_checkpoint_that_resumes(world, tmp_path, signum):
    """A cluster's preemption (SIGTERM) or Ctrl-C loses no step: the run saves the step it was in, exits 128 + the
    signal number with the way to continue, and `--resume latest` goes on from there. The signal goes to the whole
    process group, as a terminal's Ctrl-C and `scancel` do: the DataLoader worker must not die before the save."""
    output = tmp_path / "run"
    args = ["--base", world["base"], "--image-encoder", world["encoder"], "--data", world["data"], "--resolution", "16",
            "--batch-size", "4", "--max-steps", "1000000", "--save-every", "1000000", "--num-workers", "1",
            "--output", str(output)]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "ipadapter.train", *args], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a job's
    for _ in range(600):  # the run has started once its config is written; then let it take some steps
        if (output / "train_config.json").exists():
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    time.sleep(3)
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    [saved] = list_checkpoints(output)
    step = int(saved.name.split("-")[1])
    assert 0 < step < 1000000 and load_training_state(saved)["step"] == step
    assert f"interrupted by {signal.Signals(signum).name} at step {step}" in err and "--resume latest" in err
    load_adapter(saved / "adapter.safetensors")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    logged = [e.step for path in output.rglob("events.out.tfevents.*") for e in EventFileLoader(str(path)).Load()
              if any(v.tag == "loss" for v in e.summary.value)]  # fmt: skip
    # TensorBoard holds the losses up to the interruption (--log-every 10; none yet on a loaded machine's first steps)
    assert max(logged, default=0) >= step - 10
    final = train(_cfg(world, output, max_steps=step + 1, resume="latest"), show_progress=False)
    assert final.name == f"checkpoint-{step + 1}"


def test_every_data_format_gives_the_same_records(world, tmp_path):
    folder = Path(world["data"])
    records = read_records(str(folder))
    items = [{"image_file": r.key, "text": r.text} for r in records]
    (tmp_path / "data.json").write_text(json.dumps(items))
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    for path in (tmp_path / "data.json", tmp_path / "data.jsonl"):
        got = read_records(str(path), image_root=str(folder))
        assert [(r.key, r.text, r.image_path) for r in got] == [(r.key, r.text, r.image_path) for r in records]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for r in records[:8]:
            stem = Path(r.key).stem
            tar.add(r.image_path, arcname=f"{stem}.png")
            (tmp_path / f"{stem}.txt").write_text(r.text)
            tar.add(tmp_path / f"{stem}.txt", arcname=f"{stem}.txt")
    streamed = list(iter_webdataset(str(tmp_path / "shard-{000..000}.tar")))
    assert [(s.key, s.text) for s in streamed] == [(Path(r.key).stem, r.text) for r in records[:8]]
    assert streamed[0].image_bytes == Path(records[0].image_path).read_bytes()


def test_malformed_data_files_name_the_file_and_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"image_file": "a.png", "text": "a"}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"data.jsonl, line 3: not a JSON object .*'not json'"):
        read_records(str(tmp_path / "data.jsonl"))
    (tmp_path / "data.json").write_text('[{"image_file": "a.png",\n "text": "a"')
    with pytest.raises(ValueError, match=r"data.json: not valid JSON \(.* at line 2, column \d+\)"):
        read_records(str(tmp_path / "data.json"))
    (tmp_path / "items.json").write_text('[{"text": "no image"}]')
    with pytest.raises(ValueError, match=r"item 0 must be an object with 'image_file'"):
        read_records(str(tmp_path / "items.json"))
    # a caption that is not a string was trained on as its repr ("['a', 'list']"); JSONL names the line
    (tmp_path / "data.jsonl").write_text('{"image_file": "a.png", "text": "a"}\n\n{"image_file": "b.png", "text": ["a", "list"]}\n')
    with pytest.raises(ValueError, match=r"data.jsonl: line 3: 'text' must be a string \(or null: no caption\), found \['a', 'list'\]"):
        read_records(str(tmp_path / "data.jsonl"))


def test_data_as_editors_and_file_systems_leave_it(world, tmp_path):
    """Linked sub-folders (a dataset assembled without copying; they were left out silently), files with a UTF-8
    byte-order mark (a caption kept it; a JSON list was refused), an upper-case .JSON suffix (refused)."""
    records = read_records(world["data"])
    folder = tmp_path / "assembled"
    folder.mkdir()
    (folder / "linked").symlink_to(Path(world["data"]).resolve(), target_is_directory=True)
    (folder / "loop").symlink_to(folder.resolve(), target_is_directory=True)  # a link back: read once
    (folder / "own.png").write_bytes(Path(records[0].image_path).read_bytes())
    (folder / "own.txt").write_bytes("\ufeffa caption with a BOM".encode())
    got = read_records(str(folder))
    assert [r.key for r in got] == [f"linked/{r.key}" for r in records] + ["own.png"]
    assert got[-1].text == "a caption with a BOM"
    items = [{"image_file": r.image_path, "text": r.text} for r in records[:2]]
    (tmp_path / "DATA.JSON").write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())
    assert [r.text for r in read_records(str(tmp_path / "DATA.JSON"))] == [r.text for r in records[:2]]


def test_config_file_is_read_overridden_by_flags_and_checked(tmp_path):
    from ipadapter.training.loop import config_from_args

    (tmp_path / "run.json").write_text(json.dumps({"batch_size": 2, "learning_rate": 0.001, "variant": "plus"}))
    cfg = config_from_args(["--config", str(tmp_path / "run.json"), "--batch-size", "3"])
    assert (cfg.batch_size, cfg.learning_rate, cfg.variant) == (3, 0.001, "plus")  # flags win over the file
    (tmp_path / "typo.json").write_text(json.dumps({"lerning_rate": 1}))
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['lerning_rate'\]"):
        config_from_args(["--config", str(tmp_path / "typo.json")])
    (tmp_path / "broken.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON"):
        config_from_args(["--config", str(tmp_path / "broken.json")])
    with pytest.raises(FileNotFoundError, match="--config file not found"):
        config_from_args(["--config", str(tmp_path / "none.json")])
    with pytest.raises(ValueError, match="resolution must be at least 8 pixels, found 0"):
        config_from_args(["--resolution", "0"])
    for values, message in (({"batch_size": "8"}, "batch_size must be an integer, found '8'"),
                            ({"gradient_checkpointing": "false"}, "gradient_checkpointing must be true or false, "
                                                                  "found 'false'"),  # was read as true
                            ({"drop_image": -0.5, "drop_text": 0.6}, r"drop_image is a probability: expected a value "
                                                                     r"in \[0, 1\], found -0.5")):  # fmt: skip
        (tmp_path / "typed.json").write_text(json.dumps(values))
        with pytest.raises(ValueError, match=message):
            config_from_args(["--config", str(tmp_path / "typed.json")])
    assert config_from_args(["--gradient-checkpointing", "No"]).gradient_checkpointing is False
    with pytest.raises(SystemExit):  # argparse's error: "expected true or false, found 'ture'" (was: false)
        config_from_args(["--gradient-checkpointing", "ture"])
    for flag, message in (("--save-every", "save_every must be >= 1, found 0"),  # was a ZeroDivisionError mid-run
                          ("--log-every", "log_every must be >= 1, found 0"),
                          ("--keep-last", "keep_last must be >= 0, found -1"),
                          ("--learning-rate", r"learning_rate must be in \(0, 1e30\], found 0.0")):  # fmt: skip
        value = "-1" if flag == "--keep-last" else "0"
        with pytest.raises(ValueError, match=message):
            config_from_args([flag, value])


def test_unreadable_images_are_skipped_and_counted(world, tmp_path):
    data = Path(make_world_folder(tmp_path / "data", 12, seed=5))
    (data / "0003.png").write_bytes(b"not an image at all")
    (data / "0007.png").write_bytes(b"")
    final = train(_cfg(world, tmp_path / "run", data=str(data), max_steps=3, batch_size=4), show_progress=False)
    assert torch.load(final / "training_state.pt", weights_only=True)["skipped"] >= 1
    # with the embedding cache they are left out once, when it is built, and counted the same way
    cached = train(_cfg(world, tmp_path / "cached", data=str(data), max_steps=1, batch_size=4, cache_embeddings=True),
                   show_progress=False)  # fmt: skip
    assert torch.load(cached / "training_state.pt", weights_only=True)["skipped"] == 2


def test_webdataset_training_streams(world, tmp_path):
    records = read_records(world["data"])
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for r in records:
            stem = Path(r.key).stem
            tar.add(r.image_path, arcname=f"{stem}.png")
            (tmp_path / f"{stem}.txt").write_text(r.text)
            tar.add(tmp_path / f"{stem}.txt", arcname=f"{stem}.txt")
    final = train(_cfg(world, tmp_path / "run", data=str(tmp_path / "shard-000.tar"), max_steps=5), show_progress=False)
    assert torch.load(final / "training_state.pt", weights_only=True)["epoch"] >= 1  # 5 x 4 > 16: wrapped around
    # the stream's ragged end is dropped, as finite data's (a short batch left later processes an empty slice, and
    # they went on to the next epoch alone): 16 records in batches of 6 give two steps per epoch
    final = train(_cfg(world, tmp_path / "ragged", data=str(tmp_path / "shard-000.tar"), batch_size=6, max_steps=3),
                  show_progress=False)  # fmt: skip
    state = torch.load(final / "training_state.pt", weights_only=True)
    assert (state["epoch"], state["position"]) == (1, 6)
    with pytest.raises(ValueError, match=r"shard-000.tar holds 16 records, fewer than one batch of 20 x 1 processes"):
        train(_cfg(world, tmp_path / "short", data=str(tmp_path / "shard-000.tar"), batch_size=20, max_steps=1),
              show_progress=False)  # fmt: skip
    # one corrupt and one truncated shard among good ones: their readable records are kept, the run goes on
    good = (tmp_path / "shard-000.tar").read_bytes()
    (tmp_path / "shard-001.tar").write_bytes(b"\0" * 100 + b"not a tar archive" * 40)
    (tmp_path / "shard-002.tar").write_bytes(good[: len(good) // 2])
    (tmp_path / "shard-003.tar").write_bytes(good)
    streamed = list(iter_webdataset(str(tmp_path / "shard-{000..003}.tar")))
    assert 2 * len(records) < len(streamed) < 3 * len(records)  # two whole shards and part of the truncated one
    assert [s.key for s in streamed[-len(records):]] == [Path(r.key).stem for r in records]  # the last shard, whole
    train(_cfg(world, tmp_path / "run2", data=str(tmp_path / "shard-{000..003}.tar"), max_steps=2), show_progress=False)
    # exact resume while streaming with two decoding workers (they used to interleave records, so that skipping the
    # first N on resume trained some twice and others never), across an epoch end (16 records, batches of 4)
    shard = str(tmp_path / "shard-000.tar")
    straight = train(_cfg(world, tmp_path / "w", data=shard, num_workers=2, max_steps=6, save_every=6),
                     show_progress=False)  # fmt: skip
    train(_cfg(world, tmp_path / "w2", data=shard, num_workers=2, max_steps=4), show_progress=False)  # ends an epoch
    resumed = train(_cfg(world, tmp_path / "w2", data=shard, num_workers=2, max_steps=6, resume="latest"),
                    show_progress=False)  # fmt: skip
    a, b = load_file(str(straight / "adapter.safetensors")), load_file(str(resumed / "adapter.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_embedding_cache_is_built_once_and_checked(world, tmp_path):
    cache = tmp_path / "cache"
    final = train(_cfg(world, tmp_path / "a", cache_embeddings=True, cache_dir=str(cache), max_steps=2), show_progress=False)
    index = json.loads((cache / "index.json").read_text())
    assert index["count"] == 16 and len(list(cache.glob("shard-*.safetensors"))) == 1
    if os.name == "posix":  # readable as the umask allows (safetensors alone writes 0600), like the checkpoint
        umask = os.umask(0)
        os.umask(umask)
        for written in (*cache.iterdir(), final / "adapter.safetensors"):
            assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written.name
    built = (cache / "index.json").stat().st_mtime
    train(_cfg(world, tmp_path / "b", cache_embeddings=True, cache_dir=str(cache), max_steps=2), show_progress=False)
    assert (cache / "index.json").stat().st_mtime == built  # reused, not rebuilt
    assert all(torch.isfinite(p).all() for p in load_adapter(final / "adapter.safetensors").parameters())
    with pytest.raises(ValueError, match="built for other settings"):
        train(_cfg(world, tmp_path / "c", cache_embeddings=True, cache_dir=str(cache), variant="plus", max_steps=1),
              show_progress=False)
    # the same data folder with one caption changed is other data: refused, not trained on the old captions
    import shutil

    data = shutil.copytree(world["data"], tmp_path / "data")
    train(_cfg(world, tmp_path / "d", data=str(data), cache_embeddings=True, cache_dir=str(tmp_path / "cache2"),
               max_steps=1), show_progress=False)  # fmt: skip
    caption = next(iter(sorted(data.glob("*.txt"))))
    text = caption.read_text()
    caption.write_text("another caption")
    with pytest.raises(ValueError, match="built for other settings .*'records'.*use another --cache-dir"):
        train(_cfg(world, tmp_path / "e", data=str(data), cache_embeddings=True, cache_dir=str(tmp_path / "cache2"),
                   max_steps=1), show_progress=False)  # fmt: skip
    caption.write_text(text)  # the same data again: the cache is taken
    train(_cfg(world, tmp_path / "f", data=str(data), cache_embeddings=True, cache_dir=str(tmp_path / "cache2"),
               max_steps=1), show_progress=False)  # fmt: skip
    # and so is the same data copied elsewhere (it was refused: the digest held every image's absolute path)
    built = (tmp_path / "cache2" / "index.json").stat().st_mtime
    copied = shutil.copytree(data, tmp_path / "copied")
    train(_cfg(world, tmp_path / "f2", data=str(copied), cache_embeddings=True, cache_dir=str(tmp_path / "cache2"),
               max_steps=1), show_progress=False)  # fmt: skip
    assert (tmp_path / "cache2" / "index.json").stat().st_mtime == built
    # an image replaced in place under its name (another picture, another size) is other data too
    images = sorted(data.glob("*.png"))
    other = next(i for i in images[1:] if i.stat().st_size != images[0].stat().st_size)
    images[0].write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match="built for other settings .*'records'"):
        train(_cfg(world, tmp_path / "g", data=str(data), cache_embeddings=True, cache_dir=str(tmp_path / "cache2"),
                   max_steps=1), show_progress=False)  # fmt: skip
    # a cache from before the VAE's precision was recorded (SDXL's VAE now encodes in float32 under fp16) is refused
    index = json.loads((cache / "index.json").read_text())
    del index["fingerprint"]["vae_dtype"]
    (cache / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'vae_dtype': \('\(not recorded: an older ipadapter built it\)', 'torch.float32'\)"):
        train(_cfg(world, tmp_path / "h", cache_embeddings=True, cache_dir=str(cache), max_steps=1), show_progress=False)


def test_an_interrupted_cache_build_continues_after_its_last_full_shard(world, tmp_path, monkeypatch):
    """Hours of encoding are not lost to a preemption: the rebuild encodes only what the written shards lack, and
    gives the cache a build without the interruption gives (unreadable images counted once)."""
    from ipadapter.training import cache as cache_module

    data = Path(make_world_folder(tmp_path / "data", 16, seed=3))
    (data / "0002.png").write_bytes(b"broken")  # skipped before the interruption
    (data / "0013.png").write_bytes(b"")  # and after it
    monkeypatch.setattr(cache_module, "SHARD", 4)
    cfg = dict(data=str(data), cache_embeddings=True, max_steps=1)
    train(_cfg(world, tmp_path / "straight", cache_dir=str(tmp_path / "c1"), **cfg), show_progress=False)

    write, writes = cache_module.save_safetensors, []

    def killed_at_the_third_shard(tensors, path, metadata=None):
        writes.append(Path(path).name)
        if len(writes) == 4:  # uncond.safetensors, shard 0, shard 1, then the kill
            raise KeyboardInterrupt
        write(tensors, path, metadata)

    monkeypatch.setattr(cache_module, "save_safetensors", killed_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(world, tmp_path / "a", cache_dir=str(tmp_path / "c2"), **cfg), show_progress=False)
    assert sorted(p.name for p in (tmp_path / "c2").glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    monkeypatch.setattr(cache_module, "save_safetensors", write)
    encoded, encode = [], cache_module.encode_batch

    def spy(models, batch, feature):
        encoded.extend(batch["index"].tolist())
        return encode(models, batch, feature)

    monkeypatch.setattr(cache_module, "encode_batch", spy)
    train(_cfg(world, tmp_path / "b", cache_dir=str(tmp_path / "c2"), **cfg), show_progress=False)
    assert min(encoded) == 9 and 2 not in encoded  # samples 0-8 (8 cached, 1 unreadable) were not encoded again
    straight, resumed = (json.loads((tmp_path / c / "index.json").read_text()) for c in ("c1", "c2"))
    assert resumed == straight and straight["skipped"] == 2 and straight["count"] == 14
    for shard in sorted((tmp_path / "c1").glob("shard-*")):
        a, b = load_file(str(shard)), load_file(str(tmp_path / "c2" / shard.name))
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)


def test_a_resumed_cache_build_keeps_only_full_shards_of_its_settings(tmp_path, monkeypatch):
    from ipadapter.files import save_safetensors
    from ipadapter.training import cache as cache_module

    monkeypatch.setattr(cache_module, "SHARD", 2)
    expected = {"data": "a"}

    def shard(name, keys, fingerprint=expected):
        save_safetensors({"text": torch.zeros(len(keys), 1)}, tmp_path / name,
                         {"fingerprint": json.dumps(fingerprint, sort_keys=True), "keys": json.dumps(keys)})

    shard("shard-00000.safetensors", ["0", "2"])
    shard("shard-00001.safetensors", ["3", "4"])
    shard("shard-00002.safetensors", ["5"])  # the short last shard: written again
    shard("shard-100000.safetensors", ["9", "10"])  # past five digits: sorts before shard-00003 by name
    (tmp_path / "shard-x.safetensors").write_bytes(b"")
    assert cache_module.finished_shards(tmp_path, expected) == ["0", "2", "3", "4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    # an unfinished cache of other settings (another run sharing --cache-dir) is refused as a finished one is, and kept
    with pytest.raises(ValueError, match=r"holds an unfinished embedding cache of other settings \(cached, wanted\): "
                                         r"\{'data': \('a', 'b'\)\}; use another --cache-dir"):  # fmt: skip
        cache_module.finished_shards(tmp_path, {"data": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (tmp_path / "index.json").write_text(json.dumps({"count": 3}))  # a folder of something else
    with pytest.raises(ValueError, match=r"index.json is not an embedding cache's index \(expected fingerprint"):
        cache_module.EmbeddingCache(tmp_path, expected)


def records_image(world) -> str:
    return read_records(world["data"])[0].image_path


def test_fine_tune_from_an_official_checkpoint(world, tmp_path):
    first = train(_cfg(world, tmp_path / "a", max_steps=2), show_progress=False)
    official = tmp_path / "ip-adapter_tiny.bin"
    load_adapter(first / "adapter.safetensors").save(official, layout="official")
    final = train(_cfg(world, tmp_path / "b", init_adapter=str(official), max_steps=2), show_progress=False)
    a, b = load_file(str(first / "adapter.safetensors")), load_file(str(final / "adapter.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"is a 'base' adapter \(linear projection, pooled features\) but --variant "
                                         r"is 'plus' \(resampler projection, penultimate features\)"):  # fmt: skip
        train(_cfg(world, tmp_path / "c", init_adapter=str(official), variant="plus"), show_progress=False)
    # a training checkpoint folder stands for its adapter file: to fine-tune from, to convert, to generate with
    from ipadapter.cli import main

    train(_cfg(world, tmp_path / "from-folder", init_adapter=str(first), max_steps=1), show_progress=False)
    assert main(["convert", str(first), str(tmp_path / "folder.bin"), "--to", "official"]) == 0
    assert main(["generate", "--image", records_image(world), "--adapter", str(first), "--base", world["base"],
                 "--image-encoder", world["encoder"], "--steps", "1", "--out", str(tmp_path / "gen")]) == 0  # fmt: skip
    # a fine-tuning run resumes from its checkpoint, which holds every weight, when the starting file is gone
    # (the same weights as if it were there)
    import shutil

    train(_cfg(world, tmp_path / "d", init_adapter=str(official), max_steps=1, save_every=1), show_progress=False)
    shutil.copytree(tmp_path / "d", tmp_path / "e")
    there = train(_cfg(world, tmp_path / "d", init_adapter=str(official), max_steps=2, resume="latest"),
                  show_progress=False)  # fmt: skip
    official.unlink()
    gone = train(_cfg(world, tmp_path / "e", init_adapter=str(official), max_steps=2, resume="latest"),
                 show_progress=False)  # fmt: skip
    a, b = load_file(str(there / "adapter.safetensors")), load_file(str(gone / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_train_one_checkpoint(compact_world, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15); `--multi_gpu` starts two (as
    # torchrun), also without GPUs, and the trainer then sets Accelerate up for gloo on CPU. With --compile: DDP
    # around a compiled UNet call (the signal test below runs two plain processes under torchrun). The embedding
    # cache's build outlasts the process group's timeout (shortened to 10 s by the entry script): the second process
    # waits for it outside any collective (it waited in a barrier, which a real build of hours times out).
    world = compact_world
    entry = Path(__file__).with_name("train_slow_cache_build.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(entry),
           "--base", world["base"], "--image-encoder", world["encoder"], "--data", world["data"], "--resolution", "16",
           "--batch-size", "2", "--max-steps", "2", "--output", str(tmp_path / "run"), "--compile", "aot_eager",
           "--cache-embeddings", "true"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [c.name for c in checkpoints] == ["checkpoint-2"]
    load_adapter(checkpoints[0] / "adapter.safetensors")
    state = load_training_state(checkpoints[0])
    assert state["processes"] == 2  # really two processes (gloo), not one


def test_sharded_engines_settings_come_from_the_run_and_what_cannot_work_is_refused(tmp_path):
    from types import SimpleNamespace

    from ipadapter.training import sharded

    def accelerator(**config):
        plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                                                   "train_micro_batch_size_per_gpu": "auto", **config})  # fmt: skip
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), gradient_accumulation_steps=1,
                               gradient_state=SimpleNamespace(plugin_kwargs={"num_steps": 1}))  # fmt: skip

    acc = accelerator(gradient_accumulation_steps=1)  # what `accelerate config` writes
    sharded.configure(acc, batch_size=8, gradient_accumulation=4, max_grad_norm=1.0)
    config = acc.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["gradient_clipping"]) == (8, 4, 1.0)
    assert "train_batch_size" not in config and acc.gradient_accumulation_steps == 4
    with pytest.raises(ValueError, match=r"sets train_micro_batch_size_per_gpu = 16, this run's --batch-size is 8"):
        sharded.configure(accelerator(train_micro_batch_size_per_gpu=16), 8, 1, 0.0)
    with pytest.raises(ValueError, match=r"ZeRO stage 3; the trainer supports stages 1 and 2"):
        sharded.configure(accelerator(zero_optimization={"stage": 3}), 8, 1, 0.0)

    from accelerate.utils import DistributedType

    sharded.check_fsdp(DistributedType.FSDP, processes=1)  # one process: checked on a GPU (docs/training.md)
    sharded.check_fsdp(DistributedType.MULTI_GPU, processes=8)
    with pytest.raises(ValueError, match=r"FSDP over 2 processes is not supported.*DeepSpeed ZeRO-2"):
        sharded.check_fsdp(DistributedType.FSDP, processes=2)

    with pytest.raises(ValueError, match=r"trained with DeepSpeed and this run is without it"):
        sharded.check_resumable(tmp_path, {"optimizer_shards": [{}, {}]}, deepspeed=False, processes=2)
    with pytest.raises(ValueError, match=r"trained without DeepSpeed and this run is with it"):
        sharded.check_resumable(tmp_path, {"optimizer": {}}, deepspeed=True, processes=2)
    with pytest.raises(ValueError, match=r"shards of 2 processes and this run has 4; resume it with --num_processes 2"):
        sharded.check_resumable(tmp_path, {"optimizer_shards": [{}, {}]}, deepspeed=True, processes=4)


def test_mixed_precision_follows_the_launcher_unless_the_run_names_one(world, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16 -m ipadapter.train ...` trains in bf16 (the launcher tells its
    processes through ACCELERATE_MIXED_PRECISION), as diffusers' training scripts do; --mixed-precision wins."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = Trainer(_cfg(world, tmp_path / "a"), show_progress=False)
    assert trainer.cfg.mixed_precision == "bf16" and trainer.accelerator.mixed_precision == "bf16"
    assert json.loads(trainer.cfg.to_json())["mixed_precision"] == "bf16"  # what the checkpoints record
    assert Trainer(_cfg(world, tmp_path / "b", mixed_precision="no"), show_progress=False).cfg.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match=r"mixed precision 'fp8' \(ACCELERATE_MIXED_PRECISION\).*--mixed-precision"):
        Trainer(_cfg(world, tmp_path / "c"), show_progress=False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert Trainer(_cfg(world, tmp_path / "d"), show_progress=False).cfg.mixed_precision == "no"


def test_deepspeed_zero2_on_two_processes_saves_every_shard_and_resumes_exactly(compact_world, tmp_path):
    """The documented DeepSpeed route, with the example config as shipped: ZeRO-2 shards the optimizer over two
    processes (gloo on CPU), bf16 runs the adapter in bfloat16 with float32 master weights, gradient accumulation is
    DeepSpeed's. The checkpoint keeps both processes' shards and the float32 adapter; resuming it gives the
    uninterrupted run's adapter. Both images of the second process's first micro-batch are unreadable, so it takes
    the next one and runs a batch ahead of the first process: each process's own place in the data is saved and
    resumed (only the first process's was, and the resumed run drifted from the uninterrupted one)."""
    import shutil

    from ipadapter.training.loop import epoch_batches

    world = dict(compact_world)
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    records = read_records(str(data))
    first_of_second = next(epoch_batches(len(records), 0, 0, 0, 2, 2, 1))  # seed 0, epoch 0, batch 2, 2 processes
    for i in first_of_second:
        Path(records[i].image_path).write_bytes(b"not an image")
    world["data"] = str(data)
    config = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "deepspeed_zero2.yaml"

    entry = Path(__file__).with_name("train_without_shm_op.py")  # `-m ipadapter.train` minus a C++ build (see there)

    def launch(*extra: str) -> None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(entry), "--base", world["base"],
               "--image-encoder", world["encoder"], "--data", world["data"], "--resolution", "16", "--batch-size", "2",
               "--gradient-accumulation", "2", "--mixed-precision", "bf16", "--max-steps", "4", "--save-every", "2",
               *extra]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
        assert result.returncode == 0, result.stderr[-3000:]

    launch("--output", str(tmp_path / "run"))
    first, final = list_checkpoints(tmp_path / "run")
    state = load_training_state(final)  # weights_only=True: the shards are tensors and plain values
    assert state["processes"] == 2 and len(state["optimizer_shards"]) == 2
    sizes = [sum(t.numel() for t in shard["single_partition_of_fp32_groups"]) for shard in state["optimizer_shards"]]
    adapter = load_adapter(final / "adapter.safetensors")
    trained = sum(p.numel() for p in adapter.parameters())
    assert sizes[0] < trained <= sum(sizes)  # each process holds a part of the float32 master weights
    saved = load_file(str(final / "adapter.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert any(not torch.equal(bf, bf.bfloat16().float()) for bf in saved.values())  # the masters, not bf16 copies
    before = load_file(str(first / "adapter.safetensors"))
    assert any(not torch.equal(before[k], saved[k]) for k in saved)
    places = load_training_state(first)["ranks"]  # [epoch, position, skipped] of each process after 4 micro-batches
    assert places[0] == [0, 16, 0] and places[1][:2] == [1, 4] and places[1][2] >= 2  # (2 skipped, more if epoch 1 hit one)

    launch("--output", str(tmp_path / "resumed"), "--resume", str(first))
    resumed = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "adapter.safetensors"))
    assert all(torch.equal(resumed[k], saved[k]) for k in saved)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes through /proc")
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_saved_step(compact_world, tmp_path):
    """Preemption may reach one worker first: the processes agree at the next log step and save that step together,
    instead of one leaving while the other waits for it forever."""
    world = compact_world
    output = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "ipadapter.train", "--base", world["base"], "--image-encoder", world["encoder"], "--data",
           world["data"], "--resolution", "16", "--batch-size", "2", "--max-steps", "1000000", "--save-every",
           "1000000", "--log-every", "2", "--output", str(output)]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    for _ in range(1200):
        if (output / "train_config.json").exists():
            break
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    time.sleep(3)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2, children
    os.kill(int(children[-1]), signal.SIGTERM)  # one worker only
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0  # the launcher reports its workers' exit
    [saved] = list_checkpoints(output)
    state = load_training_state(saved)
    assert state["processes"] == 2 and state["step"] % 2 == 0  # saved at a log step, by both processes' agreement
    assert f"interrupted by SIGTERM at step {state['step']}" in err
    load_adapter(saved / "adapter.safetensors")


@pytest.mark.parametrize("variant", ["full", "faceid", "faceid_plusv2"])
def test_full_and_faceid_variants_train(world, tmp_path, variant):
    """... and validate: FaceID variants generate from each reference's face embedding (and its image, for
    FaceID-Plus), scored where the variant has an image encoder (plain FaceID: the grid alone)."""
    data = world["data"]
    if variant.startswith("faceid"):  # precomputed face embeddings, one file per image, as the official FaceID trainer
        from safetensors.torch import save_file

        items = []
        for r in read_records(world["data"]):
            face = tmp_path / (Path(r.key).stem + ".safetensors")
            save_file({"embedding": torch.randn(512)}, str(face))
            items.append({"image_file": r.image_path, "text": r.text, "id_embed_file": str(face)})
        (tmp_path / "faces.json").write_text(json.dumps(items))
        data = str(tmp_path / "faces.json")
    final = train(_cfg(world, tmp_path / "run", variant=variant, data=data, max_steps=2, validate_every=2,
                       validation_images=2, validation_steps=2), show_progress=False)  # fmt: skip
    adapter = load_adapter(final / "adapter.safetensors")
    assert adapter.config.projection == {"full": "mlp", "faceid": "faceid", "faceid_plusv2": "faceid_plus"}[variant]
    assert (adapter.lora is not None) == variant.startswith("faceid")  # FaceID trains its rank-128 LoRA too
    assert (tmp_path / "run" / "validation" / "step-0000002.png").is_file()
    assert (tmp_path / "run" / "validation" / "scores.tsv").is_file() == (variant != "faceid")


def test_data_with_nothing_usable_stops_with_a_clear_error_instead_of_looping(world, tmp_path):
    records = read_records(world["data"])
    items = [{"image_file": f"missing-{i}.png", "text": r.text} for i, r in enumerate(records)]
    (tmp_path / "gone.json").write_text(json.dumps(items))  # e.g. a wrong --image-root
    with pytest.raises(ValueError, match=r"no usable sample in .*gone.json: every image .* failed to load"):
        train(_cfg(world, tmp_path / "a", data=str(tmp_path / "gone.json")), show_progress=False)
    faces = [{"image_file": r.image_path, "text": r.text} for r in records]  # no id_embed_file
    (tmp_path / "faces.json").write_text(json.dumps(faces))
    with pytest.raises(ValueError, match=r"every record needs an 'id_embed_file'; 16 of 16 .* have none"):
        train(_cfg(world, tmp_path / "b", data=str(tmp_path / "faces.json"), variant="faceid"), show_progress=False)


def test_sdxl_trains_with_two_text_encoders_and_micro_conditioning(world, tmp_path):
    from tiny_models import make_sdxl_folder

    base = make_sdxl_folder(tmp_path)
    # bf16: half-precision text encoders beside the float32 UNet, also in validation (which crashed before)
    final = train(_cfg(world, tmp_path / "run", base=base, max_steps=2, gradient_accumulation=2, batch_size=2,
                       mixed_precision="bf16", validate_every=2, validation_images=1, validation_steps=2),
                  show_progress=False)  # fmt: skip
    adapter = load_adapter(final / "adapter.safetensors")
    assert adapter.config.cross_attention_dim == 32 and adapter.config.num_layers == 22
    assert (tmp_path / "run" / "validation" / "step-0000002.png").is_file()
    from ipadapter.training.models import load_frozen_models

    # fp16: SDXL's VAE (force_upcast) stays float32 as in the official SDXL trainer; SD1.5's follows the run
    sdxl, sd15 = (load_frozen_models(b, world["encoder"], True, torch.float16) for b in (base, world["base"]))
    assert sdxl.vae.dtype == torch.float32 and sdxl.text_encoders[1].dtype == torch.float16
    assert sd15.vae.dtype == torch.float16


def test_validation_saves_images_and_a_score(world, tmp_path):
    train(_cfg(world, tmp_path / "run", max_steps=2, validate_every=2, validation_images=3, validation_steps=2),
          show_progress=False)
    grid = tmp_path / "run" / "validation" / "step-0000002.png"
    from PIL import Image

    assert Image.open(grid).size == (3 * 16, 2 * 16)  # references over generations
    step, score = (tmp_path / "run" / "validation" / "scores.tsv").read_text().split()
    assert step == "2" and -1.0 <= float(score) <= 1.0


def test_validation_at_a_resolution_off_the_8_pixel_grid_does_not_end_the_run(world, tmp_path):
    """Training takes any --resolution; diffusers' pipelines generate at multiples of 8 only. A 20 px run trained
    until its first validation and then died there ("`height` and `width` have to be divisible by 8"), losing the
    steps since its last checkpoint; validation now generates at 16 px."""
    final = train(_cfg(world, tmp_path / "run", resolution=20, max_steps=2, validate_every=2, validation_images=2,
                       validation_steps=2), show_progress=False)  # fmt: skip
    assert final.name == "checkpoint-2"
    from PIL import Image

    assert Image.open(tmp_path / "run" / "validation" / "step-0000002.png").size == (2 * 20, 2 * 20)
    step, score = (tmp_path / "run" / "validation" / "scores.tsv").read_text().split()
    assert step == "2" and -1.0 <= float(score) <= 1.0


@pytest.mark.parametrize("max_steps", [4, 2])
def test_a_failing_validation_loses_no_checkpoint(world, tmp_path, monkeypatch, max_steps):
    """Validation ran before the save of the same step: one that failed (out of memory on a GPU, a pipeline error)
    ended the run without the checkpoint of that step, and at the last step without the final one."""

    def failing(self):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(Trainer, "validate", failing)
    with pytest.raises(RuntimeError, match="validation failed"):
        train(_cfg(world, tmp_path / "run", max_steps=max_steps, save_every=2, validate_every=2), show_progress=False)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]


def test_recipe_options_run_and_are_recorded(world, tmp_path):
    """bf16 autocast, gradient checkpointing, noise offset, warm-up and clipping: a run with all of them trains."""
    cfg = _cfg(world, tmp_path / "run", max_steps=2, mixed_precision="bf16", gradient_checkpointing=True,
               noise_offset=0.1, warmup_steps=5, max_grad_norm=1.0)
    final = train(cfg, show_progress=False)
    saved = TrainConfig.from_json((final / "train_config.json").read_text())
    assert saved == cfg
    assert all(torch.isfinite(p).all() for p in load_adapter(final / "adapter.safetensors").parameters())


def test_a_compiled_step_trains_the_same_adapter_without_recompiling(compact_world, tmp_path, monkeypatch):
    """--compile: the UNet's training step through torch.compile (aot_eager here: the same graph capture as inductor,
    without minutes of C++ compilation on a CI machine) gives the eager run's weights and a plain checkpoint;
    validation still generates (with the uncompiled UNet); no step recompiles, not even the one after a validation
    (the adapter's Python state is the same at every entry)."""
    world = compact_world
    import torch._dynamo

    torch._dynamo.reset()
    eager = train(_cfg(world, tmp_path / "eager", max_steps=3), show_progress=False)
    # dynamo's own patch (monkeypatch's undo would delete the setting, which breaks every later recompile)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train(_cfg(world, tmp_path / "compiled", max_steps=3, compile="aot_eager", validate_every=2,
                              validation_images=2, validation_steps=2), show_progress=False)  # fmt: skip
    # (Accelerate's own switch, `accelerate launch --dynamo_backend aot_eager`, which compiles the whole training
    # module, gave the eager weights the same way; checked by hand, left out of CI for the suite's time budget.)
    torch._dynamo.reset()
    a, b = load_file(str(eager / "adapter.safetensors")), load_file(str(compiled / "adapter.safetensors"))
    assert set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    before = load_file(str(tmp_path / "compiled" / "checkpoint-2" / "adapter.safetensors"))
    assert any(not torch.equal(before[k], b[k]) for k in b)  # the third compiled step moved the weights
    assert (tmp_path / "compiled" / "validation" / "step-0000002.png").is_file()  # and step 3 did not recompile
    with pytest.raises(ValueError, match=r"compile must be a torch.compile backend \(.*inductor.*\), found 'inductr'"):
        TrainConfig(compile="inductr")
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-compiler++",))  # a machine without one
    with pytest.raises(ValueError, match=r"--compile inductor on a CPU needs a C\+\+ compiler .*found none"):
        train(_cfg(world, tmp_path / "no-compiler", compile="inductor"), show_progress=False)
    assert not (tmp_path / "no-compiler").exists()  # refused before any model work


def test_channels_last_trains_the_same_adapter_in_nhwc(world, tmp_path):
    """--channels-last: the UNet's weights and the noisy latents it gets are NHWC, and the run trains the adapter the
    default memory format trains (the same arithmetic in another layout, up to float rounding). --cudnn-benchmark
    (the same run) turns cuDNN's algorithm search on for the run's steps only: a process-wide switch, restored."""
    # from the cache: its latents are stored NCHW (a CPU VAE's output may already be NHWC, which would test nothing)
    plain = train(_cfg(world, tmp_path / "plain", max_steps=3, cache_embeddings=True), show_progress=False)
    trainer = Trainer(_cfg(world, tmp_path / "nhwc", max_steps=3, cache_embeddings=True, channels_last=True,
                           cudnn_benchmark=True, cache_dir=str(tmp_path / "plain" / "cache")), show_progress=False)  # fmt: skip
    seen: list[tuple[bool, bool]] = []
    assert not torch.backends.cudnn.benchmark
    setup = trainer.setup

    def setup_and_watch() -> None:
        setup()
        unet = trainer.models.unet
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        unet.conv_in.register_forward_pre_hook(
            lambda module, args: seen.append((args[0].is_contiguous(memory_format=torch.channels_last),
                                              torch.backends.cudnn.benchmark)))  # fmt: skip

    trainer.setup = setup_and_watch
    nhwc = trainer.run()
    assert seen == [(True, True)] * 3  # one UNet call per step, each on NHWC latents, with the search on
    assert not torch.backends.cudnn.benchmark  # and off again after the run
    a, b = load_file(str(plain / "adapter.safetensors")), load_file(str(nhwc / "adapter.safetensors"))
    # convolutions sum in another order; through Adam (which scales near-zero gradients up to steps of about the
    # learning rate, 1e-4) that leaves differences up to 2e-6 after 3 steps, which moved the weights by up to 3e-4
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5) for k in a)
    recorded = TrainConfig.from_json((nhwc / "train_config.json").read_text())
    assert recorded.channels_last and recorded.cudnn_benchmark


def test_bad_settings_are_clear_errors(world, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"drop probabilities must sum to a value in \[0, 1\], found 1.5"):
        TrainConfig(drop_image=0.5, drop_text=0.5, drop_both=0.5)
    with pytest.raises(FileNotFoundError, match="training data not found"):
        train(_cfg(world, tmp_path / "run", data=str(tmp_path / "nothing.json")), show_progress=False)
    with pytest.raises(ValueError, match="unknown variant 'huge'"):
        train(_cfg(world, tmp_path / "run2", variant="huge"), show_progress=False)
    with pytest.raises(ValueError, match="--data is required"):  # was: every image under the current folder
        train(_cfg(world, tmp_path / "run3", data=""), show_progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--output .*file is a file; expected a folder"):
        train(_cfg(world, tmp_path / "file"), show_progress=False)
    with pytest.raises(FileNotFoundError, match="--base .*nowhere not found"):
        train(_cfg(world, tmp_path / "run4", base=str(tmp_path / "nowhere")), show_progress=False)
    # numbers that would train nothing or fail later (after the models load, or hours in)
    for fields, message in (({"learning_rate": float("inf")}, "learning_rate must be a finite number, found inf"),
                            ({"noise_offset": float("nan")}, "noise_offset must be a finite number, found nan"),
                            ({"learning_rate": 1e38}, r"learning_rate must be in \(0, 1e30\], found 1e\+38"),
                            ({"adam_beta1": 1.5}, r"adam_beta1 must be in \[0, 1\), found 1.5"),
                            ({"seed": 2**64}, r"seed must be within \[-2\*\*63, 2\*\*64\)")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            TrainConfig(**fields)
    import ipadapter.training.loop as loop_module

    with monkeypatch.context() as m:
        m.setattr(loop_module, "load_frozen_models", None)  # refused before any model would load
        with pytest.raises(ValueError, match=r"2 samples cannot fill one batch of 4 x 1 processes"):
            train(_cfg(world, tmp_path / "run5", data="tinyworld:2"), show_progress=False)
    from ipadapter.training.loop import epoch_batches, step_generator

    huge = 2**64 - 1  # any seed torch takes gives a generator (the arithmetic on it overflowed before)
    assert torch.equal(torch.rand(2, generator=step_generator(-1, 3, 0)), torch.rand(2, generator=step_generator(huge, 3, 0)))
    assert sorted(i for b in epoch_batches(8, huge, 5, 0, 2, 1, 0) for i in b) == list(range(8))


def test_tensorboard_gets_loss_and_throughput_when_installed(world, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    train(_cfg(world, tmp_path / "run", max_steps=3), show_progress=False)
    events = sorted((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file written"
    steps: dict[str, list[int]] = {}
    for path in events:
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    assert steps["loss"] == [1, 2, 3] and steps["samples_per_s"] == [1, 2, 3] and steps["lr"] == [1, 2, 3]


def test_training_without_accelerate_names_the_extra_to_install(world, tmp_path, monkeypatch, capsys):
    """`pip install ipadapter` (no [train] extra) generates; `ipadapter train` then says what to install."""
    from ipadapter.cli import main

    monkeypatch.setitem(sys.modules, "accelerate", None)  # what a missing package looks like to `import`
    args = ["train", "--base", world["base"], "--image-encoder", world["encoder"], "--data", world["data"],
            "--resolution", "16", "--max-steps", "1", "--output", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "ipadapter train needs Hugging Face Accelerate" in err and "pip install 'ipadapter[train]'" in err
