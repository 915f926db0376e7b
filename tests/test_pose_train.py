"""Pose training as a task of the run loop: deterministic, process-sharded
batches, the official schedule and layer decay, initialisation from MAE
weights, evaluation to COCO AP in metrics.jsonl, and the trained workdir
used by `python -m mae_jax.pose`."""
import json

import jax
import numpy as np
import pytest

import mae_jax
from mae_jax.errors import ConfigError
from mae_jax.pose import data as pose_data
from mae_jax.train import optim, pretrain
from mae_jax.train import pose as pose_task
from tests import helpers

pytestmark = pytest.mark.long


def _config(**fields):
  return helpers.tiny_config('pose', **fields)  # 64 x 48 crops


def test_batches_do_not_depend_on_process_count_or_resume_point():
  """Micro-batch 3 read whole, read as two processes' halves, and read by
  an iterator resumed at micro-batch 3 is the same data, bit for bit."""
  config = _config()
  instances = pose_data.training_instances(config.data)
  args = (instances, config.data, (64, 48), (32, 24), 2.0, 8, 0)
  whole = pose_data.train_batches(*args, 0)
  for _ in range(3):
    next(whole)
  third = next(whole)
  resumed = next(pose_data.train_batches(*args, 3))
  halves = [next(pose_data.train_batches(*args, 3, p, 2)) for p in (0, 1)]
  for key in ('image', 'target', 'target_weight'):
    np.testing.assert_array_equal(third[key], resumed[key])
    np.testing.assert_array_equal(
        third[key], np.concatenate([h[key] for h in halves]))
  assert third['image'].shape == (8, 64, 48, 3)
  assert third['target'].shape == (8, 32, 24, 17)
  assert third['target_weight'].shape == (8, 17)
  other_seed = next(pose_data.train_batches(*args[:-1], 1, 3))
  assert not np.array_equal(other_seed['image'], third['image'])


def test_schedule_warms_up_from_the_ratio_then_steps_down():
  schedule = optim.warmup_step_decay(1.0, 10, 100, (0.5, 0.8), 0.1, 0.001)
  lr = [float(schedule(s)) for s in (0, 5, 10, 49, 50, 79, 80, 99)]
  np.testing.assert_allclose(lr, [0.001, 0.5005, 1.0, 1.0, 0.1, 0.1, 0.01,
                                  0.01], rtol=1e-6)


def test_layer_decay_follows_the_official_layer_count():
  """ViTPose-L's recipe decays over 16 layers although it has 24 blocks:
  blocks past the 16th get scales above 1, the head and last_norm 1."""
  params = {'blocks_0': {'w': np.zeros(2)}, 'blocks_23': {'w': np.zeros(2)},
            'pos_embed': np.zeros(2), 'last_norm': {'scale': np.zeros(2)}}
  scales = optim.layer_scales(params, 16, 0.8)
  assert scales['pos_embed'] == pytest.approx(0.8 ** 17)
  assert scales['blocks_0']['w'] == pytest.approx(0.8 ** 16)
  assert scales['blocks_23']['w'] == pytest.approx(0.8 ** -7)
  assert scales['last_norm']['scale'] == 1.0


def test_flip_test_of_other_joint_sets_is_refused():
  with pytest.raises(ConfigError, match='flip_test needs the 17 COCO'):
    pose_task.PoseTask(_config(num_joints=5))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny pose run of 6 updates from a 6-update MAE pretraining workdir,
  evaluated at the end: (workdir, result, task)."""
  root = tmp_path_factory.mktemp('pose_run')
  pretrain.train(helpers.tiny_pretrain_config(
      batch_size=8, total_steps=4, warmup_steps=1, checkpoint_every_steps=4,
      figure_every_steps=0, mesh=(-1, 1)), root / 'mae')
  # On the suite's 8 devices: evaluation gathers the sharded heatmaps.
  config = _config(init_from=str(root / 'mae'), eval_every_steps=6,
                   mesh=(-1, 1))
  task = pose_task.PoseTask(config)
  _, result = pose_task.loop.run(task, root / 'pose')
  return root / 'pose', result, task


def test_pose_run_from_an_mae_workdir_records_coco_ap(trained):
  workdir, result, task = trained
  assert 'blocks_0..3' in task.initialised_from
  assert 'fresh' in task.initialised_from
  with open(workdir / 'metrics.jsonl') as f:
    evals = [r['eval'] for r in map(json.loads, f) if 'eval' in r]
  assert len(evals) == 1
  assert set(evals[0]) >= {'AP', 'AP50', 'AR', 'PCK', 'count'}
  assert 0.0 <= evals[0]['AP'] <= 1.0 and evals[0]['count'] == 1242
  assert evals[0] == pytest.approx(result)
  model, variables = mae_jax.load(workdir)
  assert type(model).__name__ == 'ViTPose'
  assert set(variables) == {'params', 'batch_stats'}
  counts = jax.tree.leaves(variables['batch_stats']['bn_0'][
      'num_batches_tracked'])
  assert int(counts[0]) == 6


def test_pose_cli_draws_the_trained_workdir_on_a_held_out_image(trained,
                                                                tmp_path):
  workdir, _, task = trained
  _, instances = task.eval_set()
  image = instances[0].file_name
  result = helpers.run(['-m', 'mae_jax.pose', '--checkpoint', workdir,
                        '--image', image, '--out', tmp_path / 'pose.png',
                        '--json', tmp_path / 'kp.json'], cwd=tmp_path,
                       timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / 'pose.png').stat().st_size > 10_000
  assert len(json.loads((tmp_path / 'kp.json').read_text())) == 1


def test_eval_only_from_a_pose_workdir_gives_its_ap(trained, tmp_path):
  """config.eval_only with init_from a trained pose workdir: the whole model
  (params and BatchNorm statistics) is taken and evaluated, giving the
  run's own last result, and nothing is trained."""
  workdir, result, _ = trained
  task = pose_task.PoseTask(_config(init_from=str(workdir), eval_only=True,
                                    mesh=(-1, 1)))
  _, again = pose_task.loop.run(task, tmp_path / 'eval')
  assert task.initialised_from.endswith('the whole pose model')
  assert again == pytest.approx(result)
