#!/usr/bin/env bash
# Follow-up of gpu_check.sh (under 5 minutes): cuDNN attention with odd
# token counts padded (mae_jax.models.layers.attend), the best batch for
# large, and huge at batch 64 per device (memory against 80 GB).
# Same set-up as gpu_check.sh; writes $OUT/gpu_followup.{log,jsonl}.
set -u
OUT=${OUT:-docs/gpu}
BUDGET=${BUDGET:-280}
source benchmarks/gpu_env.sh
RESULTS="$OUT/gpu_followup.jsonl"
: > "$RESULTS"
bench() {
  local t=$((BUDGET - SECONDS))
  if [ "$t" -lt 40 ]; then echo "-- skipped (time budget): $*"; return; fi
  timeout "$t" python3 benchmarks/pretrain_throughput.py --dtype bfloat16 \
    --steps 10 --warmup 3 --out "$RESULTS" "$@" 2>&1 \
    | grep -v "^W0000\|^I0000\|^E0000\|cuda_dnn\|cuda_blas\|cuda_fft"
  echo "   [elapsed ${SECONDS} s]"
}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "== large batch 256, cuDNN attention (odd lengths padded)"
  bench --model mae_vit_large_patch16 --batch 256 --attention cudnn
  echo "== huge batch 64 (memory), XLA and cuDNN attention"
  bench --model mae_vit_huge_patch14 --batch 64 --attention xla,cudnn
  echo "== large batch 512"
  bench --model mae_vit_large_patch16 --batch 512 --attention cudnn,xla
  date -u
} 2>&1 | tee "$OUT/gpu_followup.log"
