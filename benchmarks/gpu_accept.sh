#!/usr/bin/env bash
# The large bf16 step beside both PyTorch peers, one mae_jax mode per
# process (four mae_jax modes in one process left the peers no memory in
# the run of gpu_large.sh), in one command of at most 8.5 minutes
# (BUDGET=510 seconds):
#   C. batch 1024 without peers, four modes side by side: with and without
#      fold_qkv_bias (k's bias dropped, v's folded into the projection: two
#      of the three q, k, v bias adds gone, which with split_qkv were
#      separate kernels, 5 ms of the 161 ms step at batch 512 in
#      gpu_large.sh's profile), each with XLA's defaults and with cuBLASLt
#      epilogues (which can take bias adds into the matmul); the fastest
#      of the four (benchmarks/fastest_mode.py) is the mode of A and B;
#   A. mae_jax at batch 1024 (its best batch so far) beside the eager and
#      torch.compile peers at batch 512 (at 1024 the three do not fit one
#      card together);
#   B. mae_jax and both peers at batch 512.
# cuDNN attention, split_qkv; medians of chains of steps with one wait for
# the device per chain. Same set-up as gpu_check.sh; writes
# $OUT/gpu_accept.{log,jsonl}. Run from the repository root:
#   bash benchmarks/gpu_accept.sh
set -u
OUT=${OUT:-docs/gpu}
BUDGET=${BUDGET:-510}
source benchmarks/gpu_env.sh
RESULTS="$OUT/gpu_accept.jsonl"
: > "$RESULTS"
LARGE=(benchmarks/pretrain_throughput.py --model mae_vit_large_patch16
  --dtype bfloat16 --attention cudnn --split-qkv on --steps 5 --warmup 1
  --out "$RESULTS")
{
  header
  echo "== C. batch 1024: fold_qkv_bias off/on, XLA's defaults and cuBLASLt"
  run 150 "${LARGE[@]}" --batch 1024 --fold-qkv-bias off,on --chain 2 \
    --time-limit 125 --xla-options "base;lt=xla_gpu_enable_cublaslt=true"
  eval "MODE=($(python3 benchmarks/fastest_mode.py "$RESULTS" --batch 1024))"
  echo "== fastest at batch 1024: ${MODE[*]}"
  echo "== A. mae_jax batch 1024, peers batch 512"
  run 175 "${LARGE[@]}" "${MODE[@]}" --torch-peer eager,compile \
    --batch 1024 --peer-batch 512 --chain 2 --time-limit 150
  echo "== B. mae_jax and peers at batch 512"
  run 170 "${LARGE[@]}" "${MODE[@]}" --torch-peer eager,compile \
    --batch 512 --chain 4 --time-limit 145
  date -u
} 2>&1 | tee "$OUT/gpu_accept.log"
