"""The throughput and profile scripts run end to end on the tiny model."""
import collections
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.long

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


def test_throughput_times_modes_and_peer_side_by_side(tmp_path):
  pytest.importorskip('transformers')
  out = tmp_path / 'r.jsonl'
  printed = _run('pretrain_throughput.py', *TINY, '--steps', '2',
                 '--warmup', '1', '--attention', 'xla,chunked',
                 '--fuse-gather', 'on,off', '--fold-qkv-bias', 'off,on',
                 '--torch-peer', '--out', str(out))
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  modes, peer = lines[:8], lines[8]
  assert [(r['attention'], r['fuse_patch_gather'], r['fold_qkv_bias'])
          for r in modes] == [
              (attention, fuse, fold) for attention in ('xla', 'chunked')
              for fuse in (True, False) for fold in (False, True)]
  for r in modes:
    assert r['img_per_s'] > 0 and len(r['step_s_all']) == 2
    # the analytic FLOP count agrees with XLA's cost analysis (spec sec. 9)
    assert abs(r['xla_flops_per_step'] / (4 * r['analytic_flops_per_image'])
               - 1) < 0.1
    # same batch and model in every mode: same loss after the same steps
    assert abs(r['loss'] - modes[0]['loss']) < 1e-4
  assert peer['framework'] == 'torch' and len(peer['step_s_all']) == 2
  assert set(peer['ratio_vs_torch']) == {
      attention + fuse + fold for attention in ('xla', 'chunked')
      for fuse in ('', ' unfused-gather') for fold in ('', ' folded-bias')}
  ratio = peer['ratio_vs_torch']['chunked']
  assert abs(ratio - modes[4]['img_per_s'] / peer['img_per_s']) < 1e-9
  assert 'mae_jax (chunked attention) / torch' in printed
  # The fastest mode, as arguments for the next run (gpu_accept.sh).
  best = max(modes, key=lambda r: r['img_per_s'])
  chosen = _run('fastest_mode.py', str(out), '--batch', '4').split()
  assert chosen == ['--fold-qkv-bias', 'on' if best['fold_qkv_bias'] else
                    'off', '--xla-options', 'base']


def test_fastest_mode_names_the_fold_and_xla_options_of_the_best_record():
  from benchmarks import fastest_mode
  from benchmarks.pretrain_throughput import parse_options
  options = {'xla_gpu_enable_cublaslt': True, 'xla_gpu_autotune_level': 4}
  records = [
      {'batch': 1024, 'mode': 'cudnn', 'fold_qkv_bias': False,
       'xla_options': {}, 'img_per_s': 3200.0},
      {'batch': 1024, 'mode': 'cudnn folded-bias lt', 'fold_qkv_bias': True,
       'xla_options': options, 'img_per_s': 3300.0},
      {'batch': 1024, 'mode': 'cudnn lt', 'fold_qkv_bias': False,
       'xla_options': options, 'error': 'out of memory'},
      {'batch': 512, 'mode': 'cudnn', 'fold_qkv_bias': False,
       'xla_options': {}, 'img_per_s': 9000.0},
      {'framework': 'torch', 'peer': 'compile', 'batch': 1024,
       'img_per_s': 9000.0}]
  lines = [json.dumps(r) + '\n' for r in records] + ['\n']
  args = fastest_mode.as_arguments(fastest_mode.fastest(lines, 1024))
  assert args[:3] == ['--fold-qkv-bias', 'on', '--xla-options']
  assert parse_options(args[3]) == [('lt', options)]
  assert fastest_mode.fastest(lines, 256) is None
  assert fastest_mode.as_arguments(fastest_mode.DEFAULT) == [
      '--fold-qkv-bias', 'off', '--xla-options', 'base']


def test_profile_classifies_the_step(tmp_path):
  pytest.importorskip('transformers')
  out = tmp_path / 'p.json'
  printed = _run('profile_step.py', *TINY, '--steps', '1', '--torch-peer',
                 '--out', str(out))
  table = json.loads(out.read_text())
  shares = {row['kind']: row['share'] for row in table['kinds']}
  assert abs(sum(shares.values()) - 1) < 1e-6
  assert shares['matmul'] > 0.2 and 'matmul' in printed
  sources = {row['source']: row['share'] for row in table['sources']}
  assert abs(sum(sources.values()) - 1) < 1e-6
  assert 'unattributed' not in sources
  for part in ('dense layers', 'attention core', 'GELU', 'LayerNorm'):
    for direction in ('forward', 'backward'):
      assert any(name.startswith(part) and name.endswith(direction)
                 for name in sources), (part, direction)
  # The peer's shares are of its ops' wall times, which another process on
  # the machine (a second test worker) shifts: only their presence is
  # asserted.
  peer = {row['group']: row['share'] for row in table['torch_peer']}
  assert abs(sum(peer.values()) - 1) < 1e-6
  assert peer.get('matmul', 0) > 0 and peer.get('attention', 0) > 0, peer
  assert table['op_ms_per_step'] > 0


@pytest.mark.parametrize('batch,steps', [(256, 3), (512, 2)])
def test_gpu_kernel_tables_rebuild_from_the_kept_trace_and_hlo(tmp_path,
                                                               batch, steps):
  # docs/BENCHMARKS.md's kernel profile comes from these files: the kept
  # trace and HLO of a GPU run give the committed tables again, and the
  # command-buffer kernels are matched to their HLO fusions by name.
  gpu = os.path.join(ROOT, 'docs', 'gpu')
  out = tmp_path / 't.json'
  subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks',
                                               'trace_tables.py'),
                  os.path.join(gpu, f'trace_large_b{batch}.json.gz'),
                  os.path.join(gpu, f'hlo_large_b{batch}.txt.gz'),
                  '--steps', str(steps), '--out', str(out)],
                 cwd=tmp_path, capture_output=True, text=True, check=True)
  with open(os.path.join(gpu, f'tables_large_b{batch}.json')) as f:
    assert json.loads(out.read_text()) == json.load(f)
  tables = json.loads(out.read_text())
  sources = {row['source'] for row in tables['sources']}
  assert 'LayerNorm, backward' in sources and 'unattributed' not in sources
  # The attention kernels fall into the encoder's 24 launches per step and
  # the decoder's 8, and the decoder's 8 take longer (docs/BENCHMARKS.md).
  per_layers = collections.Counter()
  for group in tables['attention_groups']:
    per_layers[round(group['launches_per_step'])] += group['ms_per_step']
  assert set(per_layers) == {8, 24}
  assert per_layers[8] > per_layers[24]
