"""The config schema (mae_jax.schema): every field of every task in one
place, its defaults, and the one-line errors of its checks."""
import importlib
import inspect
import re

import numpy as np
import pytest

from configs import finetune, linprobe, pose, pretrain
from mae_jax import config_values, resume_rules, schema
from mae_jax.errors import ConfigError

MODULES = {'pretrain': pretrain, 'finetune': finetune, 'linprobe': linprobe,
           'pose': pose}
COMMON = ('task', 'variant', 'model', 'dtype', 'attention', 'split_qkv',
          'fold_qkv_bias', 'remat', 'scan_blocks', 'seed', 'mesh', 'batch_size', 'accum_iter', 'blr',
          'min_lr', 'weight_decay', 'epochs', 'warmup_epochs', 'total_steps',
          'warmup_steps', 'checkpoint_every_steps', 'keep_checkpoints',
          'log_every_steps', 'eval_every_steps', 'figure_every_steps',
          'skip_nonfinite', 'resume_override', 'data')
DATA = ('name', 'data_dir', 'split', 'eval_split', 'image_size', 'channels',
        'mean', 'std', 'on_error', 'max_pixels', 'shuffle_buffer', 'repeats',
        'image_key', 'label_key', 'augment')
PRETRAIN_ONLY = ('mask_ratio', 'norm_pix_loss', 'b1', 'b2',
                 'fuse_patch_gather', 'knn_k', 'knn_temperature', 'knn_pool',
                 'knn_bank_size')
CLASSIFIER_ONLY = ('init_from', 'eval_only', 'num_classes', 'global_pool',
                   'drop_path', 'layer_decay', 'clip_grad', 'mixup', 'cutmix',
                   'mixup_prob', 'mixup_switch_prob', 'smoothing')
POSE_ONLY = ('init_from', 'eval_only', 'drop_path', 'layer_decay', 'clip_grad',
             'head', 'num_joints', 'sigma', 'flip_test', 'blur',
             'layer_decay_depth', 'lr_decay_at', 'lr_decay_factor',
             'warmup_ratio')
POSE_DATA = ('detections', 'det_score_threshold', 'flip_prob',
             'half_body_prob', 'half_body_joints', 'scale_factor',
             'rot_factor')
OWN = {'pretrain': PRETRAIN_ONLY, 'finetune': CLASSIFIER_ONLY,
       'linprobe': CLASSIFIER_ONLY, 'pose': POSE_ONLY}


def _variants():
  for task, module in MODULES.items():
    for variant in (pose.VARIANTS if task == 'pose' else schema.VARIANTS):
      yield task, module, variant


@pytest.mark.parametrize('task', schema.TASKS)
def test_every_task_config_holds_every_common_field(task):
  """Each task holds the common fields, the data fields and its own ones,
  and nothing else."""
  config = schema.config(task)
  assert set(config) == set(COMMON) | set(OWN[task])
  assert set(config.data) == set(DATA) | set(
      POSE_DATA if task == 'pose' else ())
  assert config.task == task and config.data.augment == task
  assert config.skip_nonfinite is False
  assert (config.eval_every_steps == 0) == (task == 'pretrain')
  assert (config.figure_every_steps == 0) == (task != 'pretrain')


@pytest.mark.parametrize('task', schema.TASKS)
def test_schema_defaults_are_the_base_recipes(task):
  assert (schema.config(task).to_dict()
          == MODULES[task].get_config('base').to_dict())


@pytest.mark.parametrize('task,module,variant', list(_variants()))
def test_every_variant_passes_the_check(task, module, variant):
  config = module.get_config(variant)
  assert (config.task, config.variant) == (task, variant)
  if config.data.name not in schema.LOCAL_SOURCES + ('synthetic',):
    with pytest.raises(ConfigError, match='data_dir is required'):
      schema.check(config)
    config.data.data_dir = '/data/tfds'
  schema.check(config)


@pytest.mark.parametrize('task', schema.TASKS)
def test_attention_is_a_field_of_every_task_and_checked(task):
  config = MODULES[task].get_config('tiny')
  for value in schema.ATTENTION:
    config.update_from_flattened_dict({'attention': value})
    schema.check(config)
  config.attention = 'flash'
  with pytest.raises(ConfigError, match=re.escape(
      "config.attention='flash' is unknown; allowed: default, xla, cudnn, "
      'cudnn_long, chunked')):
    schema.check(config)


@pytest.mark.parametrize('task,field,value,message', [
    ('pretrain', 'mask_ratio', 1.5,
     'config.mask_ratio=1.5 must lie in the open interval (0, 1)'),
    ('pretrain', 'model', 'vit_base_patch16',
     "config.model='vit_base_patch16' is unknown; allowed: mae_vit_tiny"),
    ('finetune', 'model', 'mae_vit_base_patch16',
     "config.model='mae_vit_base_patch16' is unknown; allowed: vit_tiny"),
    ('pretrain', 'dtype', 'float16',
     "config.dtype='float16' is unknown; allowed: float32, bfloat16"),
    ('linprobe', 'variant', 'small', "config.variant='small' is unknown"),
    ('pretrain', 'batch_size', 0, 'config.batch_size=0 must be >= 1'),
    ('finetune', 'num_classes', -1,
     'config.num_classes=-1 must be >= 0 (0: taken from the dataset)'),
    ('finetune', 'eval_every_steps', -1,
     'config.eval_every_steps=-1 must be >= 0 (0: never)'),
    ('finetune', 'layer_decay', 0.0,
     'config.layer_decay=0.0 must lie in (0, 1]'),
    ('finetune', 'mixup_prob', 1.5, 'config.mixup_prob=1.5 must lie in [0, 1]'),
    ('linprobe', 'clip_grad', -1.0, 'config.clip_grad=-1.0 must be > 0 or '
     'None'),
    ('pretrain', 'blr', 0.0, 'config.blr=0.0 must be > 0'),
    ('pretrain', 'b2', 1.0, 'config.b2=1.0 must lie in [0, 1)'),
    ('pretrain', 'total_steps', 0, 'config.total_steps and config.epochs are '
     'both <= 0'),
    ('pretrain', 'resume_override', 'nosuch',
     "config.resume_override names 'nosuch', which is not a config field"),
    ('pretrain', 'data.on_error', 'ignore',
     "config.data.on_error='ignore' is unknown; allowed: skip, fail"),
    ('finetune', 'data.augment', 'bogus', "unknown data.augment='bogus'; "
     "allowed: 'pretrain', 'finetune', 'linprobe'"),
    ('pretrain', 'data.repeats', 0, 'config.data.repeats=0 must be >= 1'),
    ('pretrain', 'data.max_pixels', 0,
     'config.data.max_pixels=0 must be >= 1'),
    ('finetune', 'data.split', 'test', "config.data.split='test' is not a "
     'split of the embedded photos; allowed: all, train, validation'),
    ('pretrain', 'data.name', 'folder', 'config.data.data_dir is required '
     "for config.data.name='folder'"),
    ('linprobe', 'data.name', 'imagenet2012', 'config.data.data_dir is '
     "required for the tfds dataset config.data.name='imagenet2012'"),
    ('pretrain', 'data.image_size', 60, 'config.data.image_size=60 is not a '
     'multiple of the patch size 8 of mae_vit_tiny_patch8'),
    ('finetune', 'data.channels', 2, 'config.data.channels=2 is not '
     'supported'),
])
def test_bad_values_are_refused_in_one_line_naming_the_field(task, field,
                                                              value, message):
  config = MODULES[task].get_config('tiny')
  if field == 'total_steps':
    config.epochs = 0
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ConfigError, match='^' + re.escape(message)) as error:
    schema.check(config)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('task', sorted(MODULES))
def test_folded_qkv_biases_are_refused_without_split_qkv(task):
  config = MODULES[task].get_config('tiny')
  config.fold_qkv_bias = True
  schema.check(config)
  config.split_qkv = False
  with pytest.raises(ConfigError, match=re.escape(
      'config.fold_qkv_bias=True needs config.split_qkv=True')):
    schema.check(config)


def test_config_refuses_unknown_tasks_and_other_tasks_fields():
  with pytest.raises(ConfigError, match="config.task='segment' is unknown"):
    schema.config('segment')
  with pytest.raises(ConfigError, match="the pretrain config has no field "
                     "'layer_decay'"):
    schema.config('pretrain', layer_decay=0.5)
  with pytest.raises(ConfigError, match="no field 'data.crop'"):
    schema.config('finetune', data=dict(crop=3))
  config = schema.config('linprobe', blr=2.0, data=dict(image_size=(32, 48)))
  assert (config.blr, config.data.image_size) == (2.0, (32, 48))
  with pytest.raises(AttributeError, match='mask_ratio'):  # locked
    config.mask_ratio = 0.5


def test_not_trajectory_names_fields_of_the_tasks():
  fields = set()
  for task in schema.TASKS:
    config = schema.config(task)
    fields |= set(config) | {f'data.{k}' for k in config.data}
  assert set(resume_rules.NOT_TRAJECTORY) <= fields


def test_image_fields_are_checked_and_normalised():
  assert config_values.check_image_fields([64, 48], 1, 0.5, [0.25]) == (
      (64, 48), 1, (0.5,), (0.25,))
  with pytest.raises(ConfigError, match=re.escape(
      'config.data.mean=(0.5,) must hold config.data.channels=3 finite '
      'numbers, one per channel, e.g. --config.data.mean=(0.5,0.5,0.5)')):
    config_values.check_image_fields(64, 3, (0.5,), (1.0, 1.0, 1.0))


def test_no_defaults_in_the_input_pipeline():
  """The pipeline reads every field from the data config: no table of
  defaults, no .get(field, default), and a missing field is named."""
  pytest.importorskip('tensorflow')
  from mae_jax.data import augment, pipeline
  assert not hasattr(pipeline, '_DEFAULTS')
  assert '.get(' not in inspect.getsource(pipeline)
  assert schema.AUGMENTS == augment.TRAIN_AUGMENTS
  with pytest.raises(ConfigError, match="lacks the field 'split'"):
    pipeline.num_examples(dict(name='embedded', repeats=1))


def test_embedded_split_follows_data_split():
  """data.split of the embedded photos reaches the source: 'train' and
  'validation' give different numbers of examples and no common image."""
  pytest.importorskip('tensorflow')
  from mae_jax.data import pipeline, sources
  assert not hasattr(sources, 'embedded_split')  # no hidden context
  n = len(sources.EMBEDDED_FILES)
  out = {}
  for split, count in (('train', n), ('validation', n * 3), ('all', n)):
    data = schema.config('finetune', data=dict(
        name='embedded', image_size=32, repeats=1, split=split)).data
    assert pipeline.num_examples(data) == count
    out[split] = np.concatenate([b['image'] for b in pipeline.make_iterator(
        data, 20, seed=0, train=False)])
  assert len(out['validation']) == 3 * n
  for image in out['train']:
    assert not any(np.allclose(image, other, atol=1e-3)
                   for other in out['validation'])
  assert not np.allclose(out['train'], out['all'])  # crops, not whole photos


def test_config_files_define_no_field():
  """configs/*.py set only values: every field is defined in the schema."""
  for name in ('common', 'pretrain', 'finetune', 'linprobe'):
    source = inspect.getsource(importlib.import_module(f'configs.{name}'))
    assert 'ConfigDict' not in source and 'FieldReference' not in source
