"""`gpu_checks.sh deepspeed`'s summary: for each precision, the DeepSpeed run, the same run resumed from its middle
checkpoint, and the run without DeepSpeed, compared by their final adapters.

    python benchmarks/gpu_checks_compare.py RUNS_FOLDER fp16 bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import load_file

from ipadapter.training.checkpointing import list_checkpoints, load_training_state


def main() -> None:
    runs = Path(sys.argv[1])
    for mp in sys.argv[2:]:
        found = {run: list_checkpoints(runs / f"{mp}-{run}") for run in ("straight", "resumed", "plain")}
        missing = [run for run, checkpoints in found.items() if not checkpoints]
        if missing:  # that launch failed: its log is in the script's output folder; the other precisions still count
            print(f"{mp}: no checkpoint from the {', '.join(missing)} run(s); see {mp}-<run>.log")
            continue
        final = {run: checkpoints[-1] for run, checkpoints in found.items()}
        weights = {run: load_file(str(c / "adapter.safetensors")) for run, c in final.items()}

        def diff(a: str, b: str) -> float:
            return max((weights[a][k].float() - weights[b][k].float()).abs().max().item() for k in weights[a])

        state = load_training_state(final["straight"])
        dtypes = sorted({str(v.dtype) for v in weights["straight"].values()})
        largest = max(v.abs().max().item() for v in weights["plain"].values())
        print(f"{mp}: step {state['step']}, {len(state['optimizer_shards'])} optimizer shard(s), adapter {dtypes}; "
              f"resumed vs straight: max |diff| {diff('resumed', 'straight'):.3g}; DeepSpeed vs without: "
              f"{diff('straight', 'plain'):.3g} (largest weight {largest:.3g})")


if __name__ == "__main__":
    main()
