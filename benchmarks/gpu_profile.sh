#!/usr/bin/env bash
# The large bf16 step on one GPU, in one command of under 10 minutes:
#   A. batch 256 with cuDNN attention under several sets of XLA compiler
#      options, beside the PyTorch peer (eager, autocast), in one process;
#   B. a kernel profile of the fastest set at batch 256 (trace and optimized
#      HLO kept);
#   C. batch 512: XLA's defaults and the fastest set beside both PyTorch
#      peers (eager and torch.compile, autocast bf16) in one process.
# Steps are timed in chains of 4 (one wait for the device per chain, as the
# training loop waits only at its log intervals). Same set-up as
# gpu_check.sh; writes $OUT/gpu_profile.{log,jsonl},
# $OUT/profile_large_b256.json, $OUT/trace_large_b256.json.gz and
# $OUT/hlo_large_b256.txt.gz. Run from the repository root:
#   bash benchmarks/gpu_profile.sh
set -u
OUT=${OUT:-docs/gpu}
BUDGET=${BUDGET:-540}
source benchmarks/gpu_env.sh
RESULTS="$OUT/gpu_profile.jsonl"
: > "$RESULTS"
LARGE="--model mae_vit_large_patch16 --dtype bfloat16 --attention cudnn"
TIMING="--steps 5 --warmup 1 --chain 4 --time-limit 190 --out $RESULTS"
OPTIONS="base;lt=xla_gpu_enable_cublaslt=true"
OPTIONS+=";ws=xla_gpu_experimental_enable_triton_warp_specialization=true"
OPTIONS+=";cudnn_ln=xla_gpu_enable_cudnn_layer_norm=true"
best() {  # the fastest option set at batch 256 in $RESULTS: NAME or OPTIONS
  python3 - "$RESULTS" "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if r.get('batch') == 256 and 'img_per_s' in r
        and 'xla_options' in r]
r = max(rows, key=lambda r: r['img_per_s']) if rows else {'mode': 'cudnn',
                                                          'xla_options': {}}
name = r['mode'].split(' ', 1)[1] if ' ' in r['mode'] else 'base'
opts = ','.join(f'{k}={str(v).lower()}' for k, v in r['xla_options'].items())
print(name if sys.argv[2] == 'name' else opts)
EOF
}
{
  header
  echo "== A. large batch 256: XLA option sets, PyTorch peer (eager)"
  run 240 benchmarks/pretrain_throughput.py $LARGE --batch 256 $TIMING \
    --xla-options "$OPTIONS" --torch-peer eager
  NAME=$(best name); OPTS=$(best options)
  echo "fastest set at batch 256: $NAME ($OPTS)"
  echo "== B. profile of large batch 256, set $NAME"
  run 80 benchmarks/profile_step.py $LARGE --batch 256 --steps 3 \
    --xla-options "$OPTS" --out "$OUT/profile_large_b256.json" \
    --keep-trace "$OUT/trace_large_b256.json.gz" \
    --keep-hlo "$OUT/hlo_large_b256.txt.gz"
  SETS="base"; [ "$NAME" != base ] && SETS="base;$NAME=$OPTS"
  echo "== C. large batch 512: sets $SETS, PyTorch peers (eager, torch.compile)"
  run 250 benchmarks/pretrain_throughput.py $LARGE --batch 512 $TIMING \
    --xla-options "$SETS" --torch-peer eager,compile
  date -u
} 2>&1 | tee "$OUT/gpu_profile.log"
