#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one H100/H200):
#   device and versions; bf16 throughput of large and base at batch 256
#   with cuDNN and XLA attention (MFU from the analytic FLOP count) beside the
#   PyTorch peer with bf16 autocast on the same card; huge at batch 64
#   (memory); the parity tests on the GPU; then batch 128 while time is left.
# All JSON lines go to $OUT/gpu_results.jsonl, the log to $OUT/gpu_check.log.
#
# The GPU image has jax, flax, optax, orbax, torch, timm and transformers but
# no ml_collections: bring its wheel in .whl/, e.g.
#   pip download --no-deps -d .whl ml_collections==1.1.0
# and run from the repository root: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-docs/gpu}
BUDGET=${BUDGET:-450}   # seconds for the whole script
LOG="$OUT/gpu_check.log"
source benchmarks/gpu_env.sh
RESULTS="$OUT/gpu_results.jsonl"
: > "$RESULTS"
left() { echo $((BUDGET - SECONDS)); }
bench() {  # bench ARGS...: one configuration, skipped when time is short
  local t; t=$(left)
  if [ "$t" -lt 45 ]; then echo "-- skipped (time budget): $*"; return; fi
  [ "$t" -gt 200 ] && t=200
  timeout "$t" python3 benchmarks/pretrain_throughput.py --dtype bfloat16 \
    --steps 10 --warmup 3 --out "$RESULTS" "$@" 2>&1 \
    | grep -v "^W0000\|^I0000\|^E0000\|oneDNN\|cuda_dnn\|cuda_blas\|cuda_fft"
  echo "   [elapsed ${SECONDS} s]"
}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, flax, optax, orbax.checkpoint, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__); print(jax.devices())"
  for model in mae_vit_large_patch16 mae_vit_base_patch16; do
    echo "== $model batch 256 (cuDNN and XLA attention; PyTorch peer with bf16 autocast)"
    bench --model $model --batch 256 --attention cudnn,xla --torch-peer
  done
  echo "== huge batch 64 (memory)"
  bench --model mae_vit_huge_patch14 --batch 64 --attention cudnn
  echo "== parity tests on the GPU (fp32, highest matmul precision)"
  t=$(left); [ "$t" -gt 120 ] && t=120
  if [ "$t" -ge 45 ]; then
    timeout "$t" python3 -m pytest -q -p no:cacheprovider tests/test_parity.py \
      -k "base or classifier" 2>&1 | tail -4
  else echo "-- skipped (time budget)"; fi
  echo "   [elapsed ${SECONDS} s]"
  for model in mae_vit_large_patch16 mae_vit_base_patch16; do
    echo "== $model batch 128 (cuDNN attention; PyTorch peer)"
    bench --model $model --batch 128 --attention cudnn --torch-peer
  done
  date -u
} 2>&1 | tee "$LOG"
