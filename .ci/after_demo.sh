#!/usr/bin/env bash
# After `make demo`: the README's follow-up commands on the demo workdir,
# with the relative paths exactly as the README writes them.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
tmp=$(mktemp -d)
trap 'rm -rf "$tmp" fig.png demo.pth' EXIT

echo '--- make demo again: resumes the finished workdir'
make demo | tee "$tmp/resume.log"
grep -q 'resuming at step' "$tmp/resume.log"

echo '--- a resume that changes mask_ratio is refused, naming it'
if python train.py --config configs/pretrain.py:tiny --workdir workdirs/demo \
    --config.mask_ratio=0.6 2>"$tmp/refused.log"; then
  echo 'a resume with another mask_ratio was accepted'; exit 1
fi
cat "$tmp/refused.log"
grep -q 'mask_ratio' "$tmp/refused.log"

echo '--- visualize, load and --to-torch on the relative workdir'
python -m mae_jax.visualize --checkpoint workdirs/demo --sweep 0.5,0.75,0.9 \
    --out fig.png
test -s fig.png
python -c "import mae_jax; model, v = mae_jax.load('workdirs/demo'); print(type(model).__name__, 'loaded')"
python convert_torch_weights.py workdirs/demo demo.pth --to-torch
test -s demo.pth
echo 'after-demo checks passed'
