"""The throughput and profile scripts run end to end on the tiny model."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--model', 'mae_vit_tiny_patch8', '--image-size', '64', '--batch',
        '4']


def _run(script, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one device
  return subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks',
                                                      script), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=True).stdout


def test_throughput_times_both_gather_modes(tmp_path):
  out = tmp_path / 'r.jsonl'
  _run('pretrain_throughput.py', *TINY, '--steps', '2', '--warmup', '1',
       '--fuse-gather', 'on,off', '--out', str(out))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r['fuse_patch_gather'] for r in lines] == [True, False]
  for r in lines:
    assert r['img_per_s'] > 0 and len(r['step_s_all']) == 2
    # the analytic FLOP count agrees with XLA's cost analysis (spec sec. 9)
    assert abs(r['xla_flops_per_step'] / (4 * r['analytic_flops_per_image'])
               - 1) < 0.1
  assert abs(lines[0]['loss'] - lines[1]['loss']) < 1e-4  # same batch, model


def test_profile_classifies_the_step(tmp_path):
  out = tmp_path / 'p.json'
  printed = _run('profile_step.py', *TINY, '--steps', '1', '--out', str(out))
  table = json.loads(out.read_text())
  shares = {row['kind']: row['share'] for row in table['kinds']}
  assert abs(sum(shares.values()) - 1) < 1e-6
  assert shares['matmul'] > 0.2 and 'matmul' in printed
  assert table['op_ms_per_step'] > 0
