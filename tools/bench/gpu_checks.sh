#!/usr/bin/env bash
# The GPU figures in one call on a lent GPU machine (prepared on a CPU-only machine: not yet run on a GPU): the
# ViT-L/14 recipe step and ViT-g/14 at batch 12 on one GPU (images/s, MFU, peak memory), `dinotrain plan`'s
# predictions for both beside them, embed and serve throughput; tools/bench/gpu_report.py then writes them into
# BENCHMARKS.md (and $OUT/gpu_report.md, which comes back from the device tool).
#
#   here:   bash tools/bench/gpu_wheels.sh
#   there:  bash tools/bench/gpu_checks.sh          (device tool: carry [".whl"], timeout_s 580)
#
# Writes the tables and JSON to $OUT (or /tmp/gpu-checks). Each step has its own time limit, so one that hangs
# or runs out of memory leaves the others' figures.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
BENCH="python3 tools/bench/bench.py --device cuda --dtype bf16"
run() {  # run NAME SECONDS COMMAND...: log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2; shift 2
    echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "exit $?" >> "$OUT/$name.log"; tail -8 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
# ViT-L/14, official recipe per GPU: batch 32, 2 x 224 + 8 x 98, bf16; ours vs lightly + timm; images/s, MFU, peak
run step-L 200 $BENCH --cases step-L --batch 32 --steps 5 --warmup 2 --json "$OUT/step-L.json"
# ViT-g/14 at the official per-GPU batch 12 with FSDP2 + activation checkpointing: fits or not, peak memory
run step-g 150 $BENCH --cases step-g --batch 12 --steps 3 --warmup 1 --no-peer --json "$OUT/step-g.json"
# single optimisations on the GPU (before/after in one run)
run single 60 $BENCH --cases ibot-loss sinkhorn --steps 5 --json "$OUT/single.json"
# the data pipeline per CPU core of that machine (workers per GPU = step images/s / this)
run data 80 python3 tools/bench/data_pipeline.py --batch 32 --batches 6
# the planner's predictions for the two steps above (on this machine's CPU: fake tensors, one step each)
MEM=$(python3 -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))")
PLAN="python3 -m dinotrain plan train --gpus 1 --gpu-memory-gb $MEM --no-search --no-cuda-trace"
run plan-L 120 $PLAN --config train/vitl14 --json "$OUT/plan-L.json" train.dataset_path=x train.batch_size_per_gpu=32
run plan-g 150 $PLAN --config train/vitg14 --json "$OUT/plan-g.json" train.dataset_path=x train.batch_size_per_gpu=12 \
    fsdp.activation_checkpointing=true
# embeddings and the endpoint on the GPU
run embed 90 python3 tools/bench/embed.py --device cuda --images 512 --json "$OUT/embed.json"
run serve 60 python3 tools/bench/serve.py --seconds 20 --json "$OUT/serve.json"
python3 tools/bench/gpu_report.py "$OUT" | tee "$OUT/gpu_report.md" >> BENCHMARKS.md
