#!/usr/bin/env bash
# One prepared GPU check (about 8 minutes on one H100/H200):
#   device, parity tests on the GPU, bf16 throughput of base and large at
#   batch 128 and 256 with XLA and cuDNN attention (MFU from the analytic
#   FLOP count), the PyTorch peer with bf16 autocast at the same sizes, and
#   huge at batch 64. All JSON lines go to $OUT/gpu_results.jsonl.
#
# The GPU image has jax, flax, optax, orbax, torch, timm and transformers but
# no ml_collections: bring its wheel in .whl/ (see docs/BENCHMARKS.md), e.g.
#   pip download --no-deps -d .whl ml_collections==1.1.0
# and run from the repository root: bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-docs/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/gpu_results.jsonl"
: > "$RESULTS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"
  echo "== parity tests on the GPU"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_parity.py -k "base or classifier" 2>&1 | tail -5
  bench() { timeout 120 python3 benchmarks/pretrain_throughput.py --dtype bfloat16 --steps 10 --warmup 3 --out "$RESULTS" "$@" 2>&1 | grep -v "^W0000\|^I0000"; }
  for model in mae_vit_base_patch16 mae_vit_large_patch16; do
    for batch in 128 256; do
      echo "== $model batch $batch"
      bench --model $model --batch $batch --attention xla --torch-peer
      bench --model $model --batch $batch --attention cudnn
    done
  done
  echo "== huge at batch 64 (memory)"
  bench --model mae_vit_huge_patch14 --batch 64 --attention cudnn
  date -u
} 2>&1 | tee "$LOG"
