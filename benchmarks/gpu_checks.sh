#!/usr/bin/env bash
# The real-scale checks that need a GPU, in three parts, each one device command (10 minutes at most). A session's
# 15 minutes of device time (the machine's start included) hold the first two (about 13 minutes: call them back to
# back, while the machine is warm, train first); the third, or a rerun of one, only in another session:
#
#   bash benchmarks/gpu_checks.sh train      # issue 4: samples/s at real SD1.5 + ViT-H size, 512 px, bf16 (~8 min)
#   bash benchmarks/gpu_checks.sh inference  # issue 5: seconds per denoising step, fp16, SD1.5 at 512, and the
#                                            # image attention's host / device time per layer (~4 min)
#   bash benchmarks/gpu_checks.sh deepspeed  # DeepSpeed ZeRO-2 on one GPU, fp16 and bf16: exact resume (~3 min)
#
# Logs go to $OUT (the device tool's folder that comes back) or ./gpu-checks. `GPU_CHECKS_SMOKE=1` runs the same
# plumbing at tiny sizes on whatever device there is (a CPU check of this script, seconds to minutes).
#
# The device machine's image has torch, transformers and accelerate but not diffusers. Before the first call, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp
# and call the device with carry [".whl"]; this script installs them into /tmp/site when diffusers is missing.
# The deepspeed part also needs DeepSpeed (an sdist on PyPI: build its wheel here) and its dependencies:
#   .venv/bin/pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl hjson msgpack ninja py-cpuinfo einops pydantic pydantic-core \
#     annotated-types typing-inspection
set -u -o pipefail
part=${1:?usage: gpu_checks.sh train|inference|deepspeed}
out=${OUT:-gpu-checks}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! $py -c "import diffusers" 2>/dev/null || { [ "$part" = deepspeed ] && ! $py -c "import deepspeed" 2>/dev/null; }; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "diffusers is not installed and no .whl folder was carried (see the header of this script)" >&2
        exit 2
    fi
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
$py - <<'EOF' | tee "$out/environment.txt"
import platform, torch, diffusers, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"{gpu}; Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}")
EOF

if [ "${GPU_CHECKS_SMOKE:-0}" = 1 ]; then
    train=(--proportions sd15 --width 0.5 --resolution 128 --samples 8 --batch-size 2 --steps 2 --workers 2)
    inference=(--models tinyworld --seconds 2 --min-rounds 2)
    kernels=(--resolution 128 --calls 5 --rounds 3)
    compile=aot_eager
    deepspeed=(--data tinyworld:16:1 --resolution 32 --batch-size 2 --max-steps 4 --save-every 2)
    middle=2
    precisions=(bf16)
else
    # 352 samples: no epoch ends within the 2 + 40 steps (the official-style loop restarts its loader's workers at
    # each epoch, as tutorial_train.py does; 64 samples put two restarts into the timed steps on 2026-11-30); 40 timed
    # steps: its 8 workers decode 16 batches ahead during the warm-up, which 20 steps left mostly uncounted
    train=(--proportions sd15 --width 1.0 --resolution 512 --mixed-precision bf16 --samples 352 --batch-size 8
           --steps 40 --workers 8)
    inference=(--models tinyworld,sd15 --dtype float16 --sd15-resolution 512 --seconds 40 --min-rounds 6)
    kernels=(--dtype float16 --resolution 512)
    compile=inductor
    deepspeed=(--data tinyworld:512:1 --resolution 64 --batch-size 16 --max-steps 30 --save-every 15
               --cache-embeddings true)
    middle=15
    precisions=(fp16 bf16)
fi
device=$($py -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
case $part in
    train)
        # our trainer with the cache (eager, compiled, compiled in channels-last, cuDNN's algorithm search) vs the
        # tutorial_train.py-style loop, and the FLOPs of each model per sample (what a cache can save where time
        # follows FLOPs)
        # (channels-last alone, eager: no gain on 2026-11-30, not repeated)
        $py benchmarks/train_throughput.py "${train[@]}" --compile "$compile" \
            --row "compile=$compile,channels_last=true" --row cudnn_benchmark=true 2>&1 | tee "$out/train_throughput.txt"
        ;;
    inference)
        $py benchmarks/inference_overhead.py "${inference[@]}" --device "$device" 2>&1 | tee "$out/inference_overhead.txt"
        for tokens in 4 16; do
            $py benchmarks/attention_kernels.py "${kernels[@]}" --tokens $tokens --device "$device" 2>&1 | tee -a "$out/attention_kernels.txt"
        done
        ;;
    deepspeed)
        # the example ZeRO-2 config as shipped, one process (the machine has one GPU): a run, the same run resumed
        # from its middle checkpoint, and a run without DeepSpeed; their adapters compared
        runs=/tmp/ds-runs
        rm -rf "$runs"
        for mp in "${precisions[@]}"; do
            for run in straight resumed; do
                resume=()
                [ $run = resumed ] && resume=(--resume "$runs/$mp-straight/checkpoint-$middle")
                $py -m accelerate.commands.launch --config_file examples/accelerate/deepspeed_zero2.yaml \
                    --num_processes 1 -m ipadapter.train "${deepspeed[@]}" --mixed-precision "$mp" \
                    --output "$runs/$mp-$run" "${resume[@]}" > "$out/$mp-$run.log" 2>&1
                tail -3 "$out/$mp-$run.log"
            done
            $py -m ipadapter.train "${deepspeed[@]}" --mixed-precision "$mp" --output "$runs/$mp-plain" > "$out/$mp-plain.log" 2>&1
            tail -1 "$out/$mp-plain.log"
        done
        $py benchmarks/gpu_checks_compare.py "$runs" "${precisions[@]}" 2>&1 | tee "$out/deepspeed.txt"
        ;;
    *)
        echo "unknown part $part (train, inference or deepspeed)" >&2
        exit 2
        ;;
esac
