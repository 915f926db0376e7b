#!/usr/bin/env bash
# The large bf16 step at batch 512 on one GPU, in one command of under 7
# minutes (the run after gpu_profile.sh, whose profile showed the copies
# around attention and cuDNN's fused kernel on 50-token sequences):
#   A. cuDNN attention with q, k, v from three matmuls (config.split_qkv,
#      the default) and from slices of one, and 'cudnn_long' (XLA's
#      attention below 128 tokens), beside both PyTorch peers (eager and
#      torch.compile, autocast bf16), in one process;
#   B. a kernel profile of the fastest mode (trace and optimized HLO kept);
#   C. the fastest mode at batch 1024, alone.
# Steps are timed in chains of 4 (one wait for the device per chain). Same
# set-up as gpu_check.sh; writes $OUT/gpu_large.{log,jsonl},
# $OUT/profile_large_b512.json, $OUT/trace_large_b512.json.gz and
# $OUT/hlo_large_b512.txt.gz. Run from the repository root:
#   bash benchmarks/gpu_large.sh
set -u
OUT=${OUT:-docs/gpu}
BUDGET=${BUDGET:-390}
source benchmarks/gpu_env.sh
RESULTS="$OUT/gpu_large.jsonl"
: > "$RESULTS"
LARGE="--model mae_vit_large_patch16 --dtype bfloat16"
TIMING="--steps 5 --warmup 1 --chain 4 --out $RESULTS"
best() {  # the fastest mae_jax mode at batch 512: ATTENTION SPLIT (on/off)
  python3 - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if r.get('batch') == 512 and 'img_per_s' in r
        and 'attention' in r]
r = max(rows, key=lambda r: r['img_per_s']) if rows else {
    'attention': 'cudnn', 'split_qkv': True}
print(r['attention'], 'on' if r['split_qkv'] else 'off')
EOF
}
{
  header
  echo "== A. large batch 512: cuDNN (split and fused qkv), cudnn_long; PyTorch peers"
  run 270 benchmarks/pretrain_throughput.py $LARGE --batch 512 $TIMING \
    --time-limit 215 --attention cudnn,cudnn_long --split-qkv on,off \
    --torch-peer eager,compile
  read -r ATTENTION SPLIT < <(best)
  echo "fastest at batch 512: attention $ATTENTION, split_qkv $SPLIT"
  echo "== B. profile of large batch 512, attention $ATTENTION, split_qkv $SPLIT"
  run 60 benchmarks/profile_step.py $LARGE --batch 512 --steps 2 \
    --attention "$ATTENTION" --split-qkv "$SPLIT" \
    --out "$OUT/profile_large_b512.json" \
    --keep-trace "$OUT/trace_large_b512.json.gz" \
    --keep-hlo "$OUT/hlo_large_b512.txt.gz"
  echo "== C. large batch 1024, attention $ATTENTION, split_qkv $SPLIT"
  run 100 benchmarks/pretrain_throughput.py $LARGE --batch 1024 \
    --steps 3 --warmup 1 --chain 2 --out "$RESULTS" \
    --attention "$ATTENTION" --split-qkv "$SPLIT"
  date -u
} 2>&1 | tee "$OUT/gpu_large.log"
