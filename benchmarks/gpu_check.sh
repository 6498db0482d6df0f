#!/usr/bin/env bash
# Issue 17's GPU figures, as one script for a lent CUDA machine (docs/benchmarks.md).
#
#   bash benchmarks/gpu_check.sh            # writes into $OUT, or benchmarks/results/gpu-<date>/
#
# 1. the site's path against a bare loop at the GPU defaults (bfloat16, channels-last, pinned
#    copies; ghost clipping for DP), every model and size, with and without DP;
# 2. the same for ResNet-18 at 224 px in eager float32, and with torch.compile (no DP);
# 3. DP with per-example gradients (hooks) against ghost clipping, ResNet-18 and SmallCNN;
# 4. the reference federation's estimate from (1);
# 5. the DP-SGD GPU check (model on the GPU, moved, finite; epsilon against Opacus).
# Each step's output is kept even if a later one fails.
set -uo pipefail
out=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$out"
tp() { timeout "${STEP_TIMEOUT:-120}" python benchmarks/train_throughput.py --device cuda --images 1024 --json "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1
python -c 'import torch, opacus; print(torch.__version__, opacus.__version__, torch.cuda.get_device_name())' \
  > "$out/versions.txt" 2>&1
tp > "$out/throughput-auto.jsonl" 2> "$out/throughput-auto.err"
tp --models resnet18 --sizes 224 --precision fp32 --channels-last off > "$out/throughput-fp32.jsonl" 2> "$out/throughput-fp32.err"
tp --models resnet18 --sizes 224 --dp off --compile > "$out/throughput-compile.jsonl" 2> "$out/throughput-compile.err"
tp --models resnet18 small_cnn --sizes 64 224 --dp on --dp-clipping hooks > "$out/throughput-hooks.jsonl" 2> "$out/throughput-hooks.err"
python benchmarks/nih_estimate.py "$out/throughput-auto.jsonl" > "$out/nih-estimate.txt" 2>&1
timeout 120 python benchmarks/dp_gpu_check.py --images 512 --json > "$out/dp-gpu-check.json" 2>&1
tail -n +1 "$out"/*.jsonl "$out"/*.txt
