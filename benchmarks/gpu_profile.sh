#!/usr/bin/env bash
# Third GPU run (under 5 minutes), for the open GPU points of the
# performance targets: large at batch 256 with cuDNN and XLA attention beside
# the PyTorch peer in one process (round robin), large at batch 512, and a
# profile of the large bf16 step by op kind and source.
# Same set-up as gpu_check.sh; writes $OUT/gpu_profile.{log,jsonl} and
# $OUT/profile_large_b256_bf16.json.
set -u
OUT=${OUT:-docs/gpu}
BUDGET=${BUDGET:-280}
source benchmarks/gpu_env.sh
RESULTS="$OUT/gpu_profile.jsonl"
: > "$RESULTS"
QUIET="^W0000\|^I0000\|^E0000\|cuda_dnn\|cuda_blas\|cuda_fft"
run() {  # run MAX SCRIPT ARGS...: a benchmark for at most MAX seconds of the
         # budget, skipped when under 40 are left
  local t=$((BUDGET - SECONDS)) max=$1; shift
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -ge 40 ]; then
    timeout "$t" python3 "$@" 2>&1 | grep -v "$QUIET"
  else echo "-- skipped (time budget)"; fi
  echo "   [elapsed ${SECONDS} s]"
}
LARGE="--model mae_vit_large_patch16 --dtype bfloat16"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "== large batch 256, cuDNN and XLA attention, PyTorch peer (autocast bf16)"
  run 150 benchmarks/pretrain_throughput.py $LARGE --batch 256 --steps 10 \
    --warmup 3 --attention cudnn,xla --torch-peer --out "$RESULTS"
  echo "== large batch 512, cuDNN attention"
  run 70 benchmarks/pretrain_throughput.py $LARGE --batch 512 --steps 10 \
    --warmup 3 --attention cudnn --out "$RESULTS"
  echo "== profile of large batch 256, cuDNN attention"
  run 80 benchmarks/profile_step.py $LARGE --batch 256 --steps 3 \
    --attention cudnn --out "$OUT/profile_large_b256_bf16.json"
  date -u
} 2>&1 | tee "$OUT/gpu_profile.log"
