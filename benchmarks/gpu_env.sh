# Set-up shared by the GPU scripts; source it from the repository root after
# setting OUT and BUDGET. The GPU image has jax, flax, optax, orbax, torch
# and transformers but no ml_collections: its wheel comes in .whl/.
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
# The PyTorch peer shares the process: let JAX grow its pool instead of
# taking 75% of the card up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
