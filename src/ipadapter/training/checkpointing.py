"""Training checkpoints that cannot be lost.

`<output>/checkpoint-<step>/` holds `adapter.safetensors` (our self-describing format: usable for generation and
`ipadapter convert --to official` as it is), `training_state.pt` (optimizer, LR schedule, RNG, data position; tensors
and plain values only, read back with weights_only=True) and `train_config.json`. A checkpoint is written to a
temporary folder and renamed into place, so a kill during a save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import save_adapter

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoints in `output`, oldest first (temporary folders of interrupted saves are ignored)."""
    output = Path(output)
    if not output.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / "adapter.safetensors").is_file() and (p / "training_state.pt").is_file()]


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


def save_checkpoint(output: str | Path, step: int, adapter, training_state: dict, config_json: str, keep_last: int,
                    adapter_values: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Writes checkpoint-<step> atomically, then prunes to the newest `keep_last`. `adapter_values`: see
    `checkpoint.save_adapter`'s `values`."""
    output = Path(output)
    final = output / f"checkpoint-{step}"
    tmp = output / f".checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(adapter, tmp / "adapter.safetensors", values=adapter_values)
    torch.save(training_state, tmp / "training_state.pt")
    (tmp / "train_config.json").write_text(config_json)
    with open(tmp / "training_state.pt", "rb") as f:
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(checkpoint: str | Path) -> dict:
    """The optimizer / schedule / RNG / data state of a checkpoint; a damaged file is named, with the checkpoint
    before it in the same folder to resume from instead."""
    path = Path(checkpoint) / "training_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete training checkpoint: {path.name} missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...: all mean damaged
        raise ValueError(f"cannot resume from {checkpoint}: {path.name} is damaged or not a training state "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                         f"{_previous_hint(checkpoint)}") from error  # fmt: skip
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"cannot resume from {checkpoint}: {path.name} holds no training state; "
                         f"{_previous_hint(checkpoint)}")  # fmt: skip
    return state


def _previous_hint(checkpoint: str | Path) -> str:
    earlier = [c for c in list_checkpoints(Path(checkpoint).parent) if _step(c) < _step(Path(checkpoint))]
    return f"the previous checkpoint is {earlier[-1]} (--resume {earlier[-1]})" if earlier else "no earlier checkpoint exists"


def _step(checkpoint: Path) -> int:
    m = _NAME.match(checkpoint.name)
    return int(m.group(1)) if m else -1


def set_aside_later(output: str | Path, step: int) -> list[Path]:
    """Resuming from `step` starts a new course of the run: checkpoints of the old course beyond it are renamed
    `superseded-<step>-checkpoint-<n>` (kept, not deleted), so that keeping the last K and `--resume latest`
    follow the new course instead of deleting its checkpoints in favour of the old ones. Returns the new names."""
    moved = []
    for old in list_checkpoints(output):
        if _step(old) > step:
            target, n = old.with_name(f"superseded-{step}-{old.name}"), 1
            while target.exists():  # the same step resumed more than once
                n += 1
                target = old.with_name(f"superseded-{step}-{old.name}-{n}")
            os.replace(old, target)
            moved.append(target)
    return moved


def resolve_resume(output: str | Path, resume: str) -> Path | None:
    """'latest' -> newest complete checkpoint in output (None if there is none); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "adapter.safetensors").is_file():
        raise FileNotFoundError(f"cannot resume from {path}: expected a checkpoint folder with adapter.safetensors")
    return path


# What a checkpoint's weights are: resuming with another variant would load them into another projection. (The base
# and image encoder may move to another path or be swapped for a fine-tune; a model they do not fit fails to load.)
MODEL_FIELDS = ("variant",)
# What the run's next samples are: the seed draws each epoch's order (the saved position counts into it) and the
# resolution makes the samples. (The data itself is checked by the training state's record of it.)
DATA_FIELDS = ("seed", "resolution")


def check_resumable(checkpoint: str | Path, config: dict) -> None:
    """Raises ValueError if `checkpoint` was trained as another adapter (`MODEL_FIELDS`) than `config` describes, or
    on samples made otherwise (`DATA_FIELDS`). Other settings (steps, learning rate, batch size, precision, logging,
    ...) may change on resume."""
    saved_path = Path(checkpoint) / "train_config.json"
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError as error:
        raise ValueError(f"cannot resume from {checkpoint}: {saved_path.name} is not valid JSON ({error}); "
                         f"{_previous_hint(checkpoint)}") from error  # fmt: skip
    differ = [f"{k}: {saved[k]!r} there, {config[k]!r} now" for k in MODEL_FIELDS
              if k in saved and _kind(k, saved[k]) != _kind(k, config[k])]  # fmt: skip
    if differ:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained as another adapter ({'; '.join(differ)}); resume with the "
            f"run's own settings (its train_config.json) or start a new --output"
        )
    differ = [f"--{k.replace('_', '-')}: {saved[k]!r} there, {config[k]!r} now" for k in DATA_FIELDS
              if k in saved and k in config and saved[k] != config[k]]  # fmt: skip
    if differ:
        raise ValueError(
            f"cannot resume from {checkpoint}: a resume continues the run's course of samples, made with other settings "
            f"({'; '.join(differ)}); resume with the run's own settings (its train_config.json), or start a new stage "
            f"with these: --init-adapter {Path(checkpoint) / 'adapter.safetensors'} with a new --output"
        )


def _kind(field: str, value: str) -> object:
    """What a field's value means for the weights: a variant by its architecture (so "plus" and "sd15_plus" agree)."""
    if field == "variant":
        from ..variants import get_variant

        try:
            v = get_variant(value)
        except ValueError:
            return value
        return (v.projection, v.image_feature, v.attention, v.num_tokens)
    return value
