"""Sharded training engines through Accelerate: DeepSpeed ZeRO stages 1 and 2 (`accelerate launch --config_file
examples/accelerate/deepspeed_zero2.yaml ...`), and FSDP on one process only (`check_fsdp`).

What changes when DeepSpeed runs the optimizer:
- DeepSpeed needs a micro-batch size, and owns gradient accumulation and clipping: `configure` writes the run's
  `--batch-size`, `--gradient-accumulation` and `--max-grad-norm` into its config before `accelerate.prepare`
  (Accelerate can infer only the first, and only from a prepared DataLoader, which the trainer does not use).
- With `--mixed-precision fp16/bf16` DeepSpeed casts the whole trained module, adapter included, to that dtype and
  keeps the float32 master weights in its optimizer, sharded over the processes (ZeRO stage >= 1). The checkpoint's
  adapter is gathered from those masters (`full_precision_state`), so it is the float32 adapter, as without DeepSpeed.
- Each process's optimizer holds its own shard: the checkpoint keeps every process's shard (`gather_shards`) and a
  resume hands each process the list, from which DeepSpeed takes its own (`load_shards`; same process count).
Shards are saved as tensors and plain values only (`plain`), so `training_state.pt` still loads with
`weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import enum
import os

import torch
from torch import nn


def requested() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it tells the processes through the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_fsdp(distributed_type, processes: int) -> None:
    """Refuses FSDP over several processes. Its sharding strategies keep each process's slice of the flattened weights
    outside the forward and backward, so the adapter the trainer saves (and validates with) between steps would be a
    slice, and each process's optimizer state covers only its slice; neither is handled, and FSDP needs GPUs, so it
    cannot be tested here. DeepSpeed ZeRO-2 shards the same things (optimizer states and gradients, FSDP's
    SHARD_GRAD_OP) and is handled and tested."""
    if str(distributed_type).endswith("FSDP") and processes > 1:
        raise ValueError(
            f"FSDP over {processes} processes is not supported: between steps its processes hold slices of the weights, "
            "which the trainer's checkpoints and validation do not gather. Shard the optimizer with DeepSpeed ZeRO-2 "
            "instead (accelerate launch --config_file examples/accelerate/deepspeed_zero2.yaml ...), or use plain "
            "data parallelism (accelerate launch --multi_gpu ...); the adapter has ~22M parameters"
        )


def configure(accelerator, batch_size: int, gradient_accumulation: int, max_grad_norm: float) -> None:
    """Writes the run's settings into the DeepSpeed config; a different value set there is refused, naming both."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2):
        raise ValueError(
            f"the DeepSpeed config asks for ZeRO stage {stage}; the trainer supports stages 1 and 2 (optimizer states, "
            "and with 2 gradients, sharded over the processes; the paper trained with stage 2). Stage 3 would also "
            "shard the frozen UNet's weights, for an adapter of ~22M parameters: set zero_stage: 2"
        )
    wanted = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": gradient_accumulation,
              "gradient_clipping": float(max_grad_norm)}  # fmt: skip
    flags = {"train_micro_batch_size_per_gpu": "--batch-size", "gradient_accumulation_steps": "--gradient-accumulation",
             "gradient_clipping": "--max-grad-norm"}  # fmt: skip
    for key, value in wanted.items():
        found = config.get(key, "auto")
        # `accelerate config` writes gradient_accumulation_steps: 1 into every DeepSpeed config: the run's flag wins
        overridable = found == "auto" or (key == "gradient_accumulation_steps" and found == 1)
        if not overridable and float(found) != float(value):
            raise ValueError(
                f"the DeepSpeed config sets {key} = {found}, this run's {flags[key]} is {value}: remove it from the "
                f"DeepSpeed config (the trainer fills it in) or pass {flags[key]} {found}"
            )
        config[key] = value
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the three above and the process count
    accelerator.gradient_accumulation_steps = gradient_accumulation
    # Accelerate sets this from the yaml's gradient_accumulation_steps; the trainer's loop counts micro-batches itself
    accelerator.gradient_state.plugin_kwargs["num_steps"] = gradient_accumulation


def zero_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer inside Accelerate's wrapper (the one holding this process's shard)."""
    return optimizer.optimizer


def full_precision_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: float32 tensor} of `module`'s trainable parameters, from DeepSpeed's master weights (a collective: every
    process calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        if full is None:
            raise RuntimeError(f"DeepSpeed holds no float32 master weight for the adapter's {name}")
        state[name] = full.detach().float().cpu().clone()
    return state


def plain(value):
    """A ZeRO optimizer state as tensors, numbers, strings, lists and dicts (what `torch.load(weights_only=True)`
    reads back): objects (the loss scaler, the ZeRO stage's enum, the fragment addresses of universal checkpoints)
    become dicts of their fields or their values; `load_shards` takes their classes from the live optimizer."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    for kind in (bool, int, float, str):  # subclasses (e.g. IntEnum) become the plain type
        if isinstance(value, kind):
            return kind(value)
    if value is None:
        return value
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "__dict__"):
        return {k: plain(v) for k, v in vars(value).items() if not callable(v)}
    return str(value)


def _is_plain(value) -> bool:
    return value is None or type(value) in (bool, int, float, str, list, dict, torch.Tensor)


def local_shard(optimizer) -> dict:
    """This process's ZeRO optimizer state, in plain values."""
    return plain(zero_optimizer(optimizer).state_dict())


def gather_shards(optimizer, accelerator) -> list[dict] | None:
    """Every process's shard, in process order, on the main process (None elsewhere). A collective."""
    mine = local_shard(optimizer)
    if accelerator.num_processes == 1:
        return [mine]
    import torch.distributed as dist

    shards = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(mine, shards, dst=0)
    return shards


def check_resumable(checkpoint, state: dict, deepspeed: bool, processes: int) -> None:
    """Raises ValueError, before any model work, if the checkpoint's optimizer state cannot be given to this run: one
    trained with DeepSpeed resumed without it or the reverse, or DeepSpeed shards of another process count."""
    shards = state.get("optimizer_shards")
    if (shards is not None) != deepspeed:
        was, now = ("with", "without") if shards is not None else ("without", "with")
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained {was} DeepSpeed and this run is {now} it (their optimizer "
            "states differ); resume it launched as it was trained"
        )
    if shards is not None and len(shards) != processes:
        raise ValueError(
            f"cannot resume from {checkpoint}: it holds the DeepSpeed optimizer shards of {len(shards)} processes and "
            f"this run has {processes}; resume it with --num_processes {len(shards)}"
        )


def load_shards(optimizer, shards: list[dict]) -> None:
    """Gives the ZeRO optimizer its shard of a checkpoint (with the float32 master weights, so that a resume is exact)."""
    zero = zero_optimizer(optimizer)
    live = zero.state_dict()
    restored = []
    for shard in shards:
        shard = dict(shard)
        for key, value in live.items():  # objects were saved as plain values: the live optimizer's, saved fields back
            if not _is_plain(value):
                shard[key] = _restore_object(value, shard.get(key))
        restored.append(shard)
    zero.load_state_dict(restored, load_optimizer_states=True, load_from_fp32_weights=True)


def _restore_object(live, saved):
    """The live optimizer's object with the saved fields put back (the loss scale of fp16 runs)."""
    if saved is None or isinstance(live, enum.Enum) or not hasattr(live, "__dict__") or not isinstance(saved, dict):
        return live
    for name, value in saved.items():
        current = getattr(live, name, None)
        if isinstance(current, (bool, int, float)) and isinstance(value, (bool, int, float)):
            setattr(live, name, type(current)(value))
    return live
