# Set-up shared by the GPU scripts; source it from the repository root after
# setting OUT and BUDGET. The GPU image has jax, flax, optax, orbax, torch
# and transformers but no ml_collections: its wheel comes in .whl/. Defines
# `header` and `run` (below) for the scripts' logs.
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
# The PyTorch peer shares the process: let JAX grow its pool instead of
# taking 75% of the card up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# A compile reused by a later process of the same script (a profile of a
# mode timed before it) comes from this cache.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/mae_jax_cache}

header() {  # the date, the card and the versions, at the top of a log
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
}

QUIET="^W0000\|^I0000\|^E0000\|cuda_dnn\|cuda_blas\|cuda_fft\|UserWarning\|warnings.warn"
run() {  # run MAX SCRIPT ARGS...: a python script for at most MAX seconds of
         # BUDGET (counted from the script's start), skipped when under 40
         # are left; the libraries' log noise filtered out
  local t=$((BUDGET - SECONDS)) max=$1; shift
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -ge 40 ]; then
    timeout "$t" python3 "$@" 2>&1 | grep -v "$QUIET"
  else echo "-- skipped (time budget)"; fi
  echo "   [elapsed ${SECONDS} s]"
}
