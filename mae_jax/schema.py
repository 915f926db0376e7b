"""The config schema: every field of the tasks, with its default, the
values it allows and its check (the rule for resuming from a checkpoint:
mae_jax.resume_rules).

Tasks: 'pretrain' (MAE pretraining), 'finetune' and 'linprobe' (classifiers
of a pretrained encoder), 'pose' (ViTPose, top-down 2D pose; the official
COCO recipe of Xu et al. 2022, ViTPose_base_coco_256x192.py).
`config(task, **values)` is the locked config of a task, every field
present; configs/*.py build their variants from it.
`check(config)` runs before anything is compiled. The defaults below are the
ImageNet recipes of the base model (He et al. 2021, "Masked Autoencoders Are
Scalable Vision Learners", appendix A.1, Tables 8-10; the official code's
main_pretrain.py, main_finetune.py and main_linprobe.py; for pose, the
ViTPose-B COCO configuration).

Each error is one line naming the field, the bad value and what is allowed.
"""
import json
import numbers

import ml_collections
from ml_collections.config_dict import placeholder

from mae_jax.config_values import (BOOL, NAME, NON_NEGATIVE, POSITIVE,
                                  PROBABILITY, at_least, check_image_fields,
                                  is_name, number)
from mae_jax.errors import ConfigError
from mae_jax.images import IMAGENET_MEAN, IMAGENET_STD, MAX_PIXELS
from mae_jax.models import MAE_CONFIGS, POSE_CONFIGS, VIT_CONFIGS
from mae_jax.models.pose import HEADS
from mae_jax.models.geometry import normalize_img_size

TASKS = ('pretrain', 'finetune', 'linprobe', 'pose')
VARIANTS = ('tiny', 'digits', 'base', 'large', 'huge')
DTYPES = ('float32', 'bfloat16')
ATTENTION = ('default', 'xla', 'cudnn', 'cudnn_long', 'chunked')
AUGMENTS = ('pretrain', 'finetune', 'linprobe', 'none')  # data.augment
POSE_AUGMENTS = ('pose', 'none')  # a pose config's data.augment
POSE_SOURCES = ('synthetic', 'coco')  # a pose config's data.name
BLURS = ('official', 'transformers')  # mae_jax.pose.decode
LOCAL_SOURCES = ('embedded', 'digits', 'folder')
EMBEDDED_SPLITS = ('all', 'train', 'validation')  # see data.sources.embedded
DIGITS_SPLITS = ('all', 'train', 'validation')  # see data.digits
_FIXED_SPLITS = {'embedded': ('the embedded photos', EMBEDDED_SPLITS),
                 'digits': ('the digits', DIGITS_SPLITS)}
ON_ERROR = ('skip', 'fail')
KNN_POOLS = ('cls', 'mean')
# Defaults that differ between the tasks (the base model's recipe of each).
_TASK_DEFAULTS = {
    'pretrain': dict(model='mae_vit_base_patch16', batch_size=4096,
                     blr=1.5e-4, min_lr=0.0, weight_decay=0.05, epochs=800,
                     warmup_epochs=40, eval_every_steps=0,
                     figure_every_steps=5000),
    'finetune': dict(model='vit_base_patch16', batch_size=1024, blr=5e-4,
                     min_lr=1e-6, weight_decay=0.05, epochs=100,
                     warmup_epochs=5, eval_every_steps=1250,
                     figure_every_steps=0, global_pool=True, drop_path=0.1,
                     layer_decay=0.65, mixup=0.8, cutmix=1.0, smoothing=0.1),
    'linprobe': dict(model='vit_base_patch16', batch_size=16384, blr=0.1,
                     min_lr=0.0, weight_decay=0.0, epochs=90,
                     warmup_epochs=10, eval_every_steps=78,
                     figure_every_steps=0, global_pool=False, drop_path=0.0,
                     layer_decay=0.75, mixup=0.0, cutmix=0.0, smoothing=0.0),
    # lr 5e-4 at batch 512 (64 x 8 GPUs), 210 epochs, warm-up 500 updates;
    # evaluation every 10 epochs of COCO train2017's 149,813 instances.
    'pose': dict(model='vitpose_base_patch16', batch_size=512, blr=2.5e-4,
                 min_lr=0.0, weight_decay=0.1, epochs=210, warmup_epochs=0,
                 warmup_steps=500, eval_every_steps=2930,
                 figure_every_steps=0, drop_path=0.3, layer_decay=0.75),
}
_REGISTRIES = {'pretrain': MAE_CONFIGS, 'finetune': VIT_CONFIGS,
               'linprobe': VIT_CONFIGS, 'pose': POSE_CONFIGS}


def config(task, **values):
  """The locked config of `task` with every field at its default, then
  `values` (nested ones as data=dict(image_size=64)); an unknown task or
  field is a ConfigError naming it."""
  if task not in TASKS:
    raise ConfigError(f'config.task={task!r} is unknown; allowed: '
                      f'{", ".join(TASKS)}')
  d = _TASK_DEFAULTS[task]
  c = ml_collections.ConfigDict()
  c.task = task
  c.variant = 'base'                 # tiny | digits | base | large | huge
  c.model = d['model']               # mae_jax.models registry name
  c.dtype = 'bfloat16'               # compute dtype; parameters stay float32
  c.attention = 'default'            # 'default' ('chunked' on CPU, else XLA's),
                                     # 'xla', 'chunked', 'cudnn' (GPU only) or
                                     # 'cudnn_long' (cuDNN from 128 tokens)
  c.split_qkv = True                 # q, k, v from three matmuls, no copies
  c.fold_qkv_bias = False            # drop k's bias, fold v's into the
                                     # output projection's (same function)
  c.remat = False                    # recompute block activations in backward
  c.scan_blocks = False              # nn.scan over blocks: faster compiles,
                                     # params stacked (saved in that layout)
  if task == 'pretrain':
    c.mask_ratio = 0.75              # fraction of patches removed
    c.norm_pix_loss = True           # targets: per-patch normalised pixels
    c.fuse_patch_gather = True       # embed only the visible patches
    # Online k-NN probe (mae_jax.train.knn), every eval_every_steps: encoder
    # features of data.split (the bank) label those of data.eval_split.
    c.knn_k = 20                     # neighbours voting
    c.knn_temperature = 0.07         # vote weight exp(cosine / temperature)
    c.knn_pool = 'cls'               # feature: 'cls' token or 'mean' of the
                                     # patch tokens, after the encoder norm
    c.knn_bank_size = 50_000         # bank: at most this many examples (the
                                     # first of data.split, in order)
  else:
    c.init_from = placeholder(str)   # pretrained weights: .pth or mae_jax dir
    c.eval_only = False              # True: evaluate init_from / the workdir
    c.drop_path = d['drop_path']     # stochastic depth rate
  if task in ('finetune', 'linprobe'):
    c.num_classes = 0                # 0: from the dataset
    c.global_pool = d['global_pool']  # True: mean of patch tokens + fc_norm;
                                     # False: cls token (linear probing)
  if task == 'pose':
    c.head = 'classic'               # heatmap head: 'classic' or 'simple'
    c.num_joints = 17                # COCO's
    c.sigma = 2.0                    # UDP Gaussian targets, heatmap pixels
    c.flip_test = True               # evaluation: average with the mirror
    c.blur = 'official'              # DARK-UDP blur (mae_jax.pose.decode)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'imagenet2012'       # 'embedded', 'digits', 'folder' or a
                                     # tfds name
  c.data.data_dir = placeholder(str)  # folder root or tfds data_dir
  c.data.split = 'train'             # folder sub-directory or tfds split;
                                     # embedded: 'all' (whole photos), 'train'
                                     # or 'validation' (held-out crops);
                                     # digits: 'all', 'train' (4,000) or
                                     # 'validation' (1,000)
  c.data.eval_split = 'validation'   # the split evaluations read
  c.data.image_size = ml_collections.FieldReference(  # int or (H, W):
      224, field_type=object)        # --config.data.image_size=(64,48)
  c.data.channels = 3                # 3: RGB; 1: grayscale (PIL 'L')
  c.data.mean = IMAGENET_MEAN        # per channel, of [0, 1] pixels:
  c.data.std = IMAGENET_STD          # --config.data.mean=(0.5,) for 1 channel
  c.data.augment = task              # training transform, one of AUGMENTS
                                     # (pose: 'pose' or 'none')
  c.data.on_error = 'skip'           # unreadable image files: 'skip' | 'fail'
  c.data.max_pixels = MAX_PIXELS     # larger images are skipped (PIL's
                                     # MAX_IMAGE_PIXELS)
  c.data.shuffle_buffer = 10_000     # TFDS examples in the shuffle buffer
  c.data.repeats = placeholder(int)  # copies of each embedded photo per
                                     # epoch; None: an epoch of at least 256
                                     # examples
  c.data.image_key = 'image'         # TFDS feature names
  c.data.label_key = 'label'
  if task == 'pose':  # data.name: 'synthetic' (embedded) or 'coco' (data_dir
    # with annotations/person_keypoints_<split>.json and <split>/ images)
    c.data.name = 'coco'
    c.data.split, c.data.eval_split = 'train2017', 'val2017'
    c.data.image_size = (256, 192)   # the model input (H, W)
    c.data.detections = placeholder(str)  # eval boxes: COCO detection
                                     # results JSON; None: ground truth
    c.data.det_score_threshold = 0.0  # detections below it are dropped
    c.data.flip_prob = 0.5           # the official training transforms
    c.data.half_body_prob = 0.3
    c.data.half_body_joints = 8      # visible joints needed for half body
    c.data.scale_factor = 0.5        # box scale 1 +- this (clipped normal)
    c.data.rot_factor = 40.0         # rotation, degrees (clipped normal)

  c.batch_size = d['batch_size']     # global batch of one micro-step
  c.accum_iter = 1                   # effective batch = batch_size * accum_iter
  c.blr = d['blr']                   # lr = blr * effective batch / 256
  c.min_lr = d['min_lr']             # floor of the half-cycle cosine
  c.weight_decay = d['weight_decay']
  if task == 'pretrain':
    c.b1, c.b2 = 0.9, 0.95           # AdamW betas
  else:
    c.layer_decay = d['layer_decay']  # layer-wise lr decay (fine-tuning)
    c.clip_grad = placeholder(float)  # max global gradient norm; None: off
  if task == 'pose':
    c.clip_grad = 1.0
    c.layer_decay_depth = 12         # the decay's layer count (the official
                                     # num_layers: 12 B, 16 L, 32 H)
    c.lr_decay_at = (170 / 210, 200 / 210)  # fractions of the run where
    c.lr_decay_factor = 0.1          # the lr is multiplied by this
    c.warmup_ratio = 0.001           # warm-up starts at this fraction
  if task in ('finetune', 'linprobe'):
    c.mixup = d['mixup']             # Beta alpha; 0 disables
    c.cutmix = d['cutmix']           # Beta alpha; 0 disables
    c.mixup_prob = 1.0               # chance a batch is mixed at all
    c.mixup_switch_prob = 0.5        # chance a mixed batch uses cutmix
    c.smoothing = d['smoothing']     # label smoothing
  c.epochs = d['epochs']
  c.warmup_epochs = d['warmup_epochs']
  c.total_steps = 0                  # optimizer updates; > 0 overrides epochs
  c.warmup_steps = d.get('warmup_steps', 0)  # > 0 overrides warmup_epochs

  c.seed = 0
  c.mesh = (-1, 1)                   # (data, fsdp); -1: the remaining devices
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.log_every_steps = 100
  c.eval_every_steps = d['eval_every_steps']  # 0: never
  c.figure_every_steps = d['figure_every_steps']  # reconstructions; 0: never
  c.skip_nonfinite = False           # True: skip NaN/Inf updates, else stop
  c.resume_override = ''             # 'total_steps,epochs': config fields a
                                     # resumed run may change (every field
                                     # but the logging/checkpoint/execution
                                     # ones must match its checkpoint)
  c.lock()
  flat, fields = flat_fields(values), flat_fields(c.to_dict())
  for name in flat:
    if name not in fields:
      raise ConfigError(f'the {task} config has no field {name!r}')
  c.update_from_flattened_dict(flat)
  return c


# field: (predicate, what is allowed); the choice fields are checked apart.
_COMMON = {
    'remat': BOOL, 'scan_blocks': BOOL, 'split_qkv': BOOL,
    'fold_qkv_bias': BOOL,
    'skip_nonfinite': BOOL,
    'seed': at_least(0), 'batch_size': at_least(1), 'accum_iter': at_least(1),
    'blr': POSITIVE, 'min_lr': NON_NEGATIVE,
    'weight_decay': NON_NEGATIVE, 'epochs': NON_NEGATIVE,
    'warmup_epochs': NON_NEGATIVE, 'total_steps': at_least(0),
    'warmup_steps': at_least(0), 'checkpoint_every_steps': at_least(1),
    'keep_checkpoints': at_least(1), 'log_every_steps': at_least(1),
    'eval_every_steps': (at_least(0)[0], 'must be >= 0 (0: never)'),
    'figure_every_steps': (at_least(0)[0], 'must be >= 0 (0: never)'),
    'data.name': NAME, 'data.split': NAME, 'data.eval_split': NAME,
    'data.max_pixels': at_least(1), 'data.shuffle_buffer': at_least(1),
    'data.repeats': (lambda v: v is None or at_least(1)[0](v),
                     'must be >= 1 or None'),
    'data.image_key': NAME, 'data.label_key': NAME,
    'resume_override': (lambda v: isinstance(v, str), 'must be a string'),
}
_PRETRAIN = {
    'mask_ratio': number(lambda v: 0 < v < 1,
                         'must lie in the open interval (0, 1)'),
    'norm_pix_loss': BOOL, 'fuse_patch_gather': BOOL,
    'b1': number(lambda v: 0 <= v < 1, 'must lie in [0, 1)'),
    'b2': number(lambda v: 0 <= v < 1, 'must lie in [0, 1)'),
    'knn_k': at_least(1), 'knn_temperature': POSITIVE,
    'knn_bank_size': at_least(1),
}
_DOWNSTREAM = {  # the tasks that start from pretrained weights
    'eval_only': BOOL,
    'init_from': (lambda v: v is None or is_name(v),
                  'must be a path or None'),
    'drop_path': number(lambda v: 0 <= v < 1, 'must lie in [0, 1)'),
    'layer_decay': number(lambda v: 0 < v <= 1, 'must lie in (0, 1]'),
    'clip_grad': number(lambda v: v > 0, 'must be > 0', none=True),
}
_CLASSIFIER = dict(
    _DOWNSTREAM, global_pool=BOOL,
    num_classes=(at_least(0)[0], 'must be >= 0 (0: taken from the dataset)'),
    mixup=NON_NEGATIVE, cutmix=NON_NEGATIVE, mixup_prob=PROBABILITY,
    mixup_switch_prob=PROBABILITY,
    smoothing=number(lambda v: 0 <= v < 1, 'must lie in [0, 1)'))
_POSE = dict(
    _DOWNSTREAM, flip_test=BOOL, num_joints=at_least(1), sigma=POSITIVE,
    layer_decay_depth=at_least(1),
    lr_decay_factor=number(lambda v: 0 < v <= 1, 'must lie in (0, 1]'),
    warmup_ratio=PROBABILITY, **{
        'data.det_score_threshold': NON_NEGATIVE,
        'data.flip_prob': PROBABILITY, 'data.half_body_prob': PROBABILITY,
        'data.half_body_joints': at_least(1), 'data.scale_factor': NON_NEGATIVE,
        'data.rot_factor': NON_NEGATIVE,
        'data.detections': (lambda v: v is None or is_name(v),
                            'must be a path or None')})
_RULES = {'pretrain': _PRETRAIN, 'finetune': _CLASSIFIER,
          'linprobe': _CLASSIFIER, 'pose': _POSE}


def _get(config, field):
  for part in field.split('.'):
    config = config[part]
  return config


def _one_of(config, field, allowed):
  value = _get(config, field)
  if isinstance(value, bool) or value not in allowed:
    raise ConfigError(f'config.{field}={value!r} is unknown; allowed: '
                      f'{", ".join(allowed)}')


def check(config):
  """Raises ConfigError naming the first bad field of a config of any task.

  (config.mesh is checked against the devices by train.sharding.make_mesh.)
  """
  _one_of(config, 'task', TASKS)
  registry = _REGISTRIES[config.task]
  pose = config.task == 'pose'
  for field, allowed in (('variant', VARIANTS), ('model', tuple(registry)),
                         ('dtype', DTYPES), ('attention', ATTENTION),
                         ('data.on_error', ON_ERROR)):
    _one_of(config, field, allowed)
  if config.task == 'pretrain':
    _one_of(config, 'knn_pool', KNN_POOLS)
  if pose:
    for field, allowed in (('head', HEADS), ('blur', BLURS),
                           ('data.name', POSE_SOURCES)):
      _one_of(config, field, allowed)
  augments = POSE_AUGMENTS if pose else AUGMENTS
  if config.data.augment not in augments:  # worded as augment's own error
    raise ConfigError(f'unknown data.augment={config.data.augment!r}; '
                      f'allowed: {", ".join(map(repr, augments))}')
  rules = dict(_COMMON, **_RULES[config.task])
  for field, (ok, allowed) in rules.items():
    value = _get(config, field)
    if not ok(value):
      raise ConfigError(f'config.{field}={value!r} {allowed}')
  data = config.data
  hw, _, _, _ = check_image_fields(data.image_size, data.channels, data.mean,
                                   data.std)
  patch = registry[config.model]['patch_size']
  if any(side % patch for side in hw):
    raise ConfigError(f'config.data.image_size='
                      f'{normalize_img_size(data.image_size)!r} is not a '
                      f'multiple of the patch size {patch} of {config.model}')
  if config.fold_qkv_bias and not config.split_qkv:
    raise ConfigError('config.fold_qkv_bias=True needs config.split_qkv=True')
  if config.total_steps <= 0 and config.epochs <= 0:
    raise ConfigError('config.total_steps and config.epochs are both <= 0; '
                      'set one of them to a positive number')
  resume_overrides(config)
  if data.name in _FIXED_SPLITS:
    what, splits = _FIXED_SPLITS[data.name]
    for field in ('split', 'eval_split'):
      if data[field] not in splits:
        raise ConfigError(f'config.data.{field}={data[field]!r} is not a '
                          f'split of {what}; allowed: {", ".join(splits)}')
  if pose:
    _check_pose(config)
  elif data.name == 'folder' and not data.data_dir:
    raise ConfigError("config.data.data_dir is required for "
                      "config.data.name='folder' (DIR/<split>/<class>/*.jpg)")
  elif data.name not in LOCAL_SOURCES and not data.data_dir:
    raise ConfigError(f'config.data.data_dir is required for the tfds dataset '
                      f'config.data.name={data.name!r}; use one of '
                      f'{", ".join(LOCAL_SOURCES)} or a tfds name with its '
                      'data_dir')


def _check_pose(config):
  """The pose fields that need more than one value's check."""
  steps = config.lr_decay_at
  if (not isinstance(steps, (list, tuple)) or list(steps) != sorted(steps)
      or not all(isinstance(v, numbers.Real) and 0 < v < 1 for v in steps)):
    raise ConfigError(f'config.lr_decay_at={steps!r} must be increasing '
                      'fractions of the run in (0, 1), e.g. (0.8, 0.95)')
  if config.data.name == 'coco' and not config.data.data_dir:
    raise ConfigError("config.data.data_dir is required for "
                      "config.data.name='coco' (DIR/annotations/person_"
                      "keypoints_<split>.json and DIR/<split>/*.jpg)")
  if config.data.channels != 3:
    raise ConfigError(f'config.data.channels={config.data.channels} is not '
                      'supported for pose: the crops are RGB')


def flat_fields(tree, prefix=''):
  """{'data.image_size': value, ...} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat_fields(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def resume_overrides(config):
  """Field names of config.resume_override ('total_steps,epochs'), each a
  config field; raises ConfigError naming one that is not."""
  names = [n.strip() for n in config.resume_override.split(',') if n.strip()]
  fields = flat_fields(json.loads(config.to_json()))
  for name in names:
    if name not in fields:
      raise ConfigError(f'config.resume_override names {name!r}, which is '
                        'not a config field (write nested ones as '
                        'data.image_size)')
  return names
