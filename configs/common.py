"""Fields shared by the fine-tuning and linear-probing configs."""
import ml_collections

from mae_jax.config_check import IMAGENET_MEAN, IMAGENET_STD

SIZES = ('tiny', 'base', 'large', 'huge')
MODELS = {'tiny': 'vit_tiny_patch8', 'base': 'vit_base_patch16',
          'large': 'vit_large_patch16', 'huge': 'vit_huge_patch14'}


def classifier_config(task, variant, recipe):
  """Locked config for `task` ('finetune' | 'linprobe') of size `variant`;
  `recipe` overrides the ImageNet defaults below."""
  if variant not in SIZES:
    raise ValueError(f'unknown {task} variant {variant!r}; choose one of '
                     f'{", ".join(SIZES)}')
  v = dict(image_size=224, dataset='imagenet2012', eval_split='validation',
           augment=task, batch_size=1024, epochs=100, total_steps=0,
           warmup_epochs=5, warmup_steps=0, blr=5e-4, min_lr=1e-6,
           weight_decay=0.05, layer_decay=0.75, drop_path=0.1,
           global_pool=True, dtype='bfloat16', checkpoint_every_steps=1000,
           log_every_steps=100, eval_every_steps=1250, mixup=0.8, cutmix=1.0,
           smoothing=0.1)
  v.update(recipe)
  if variant == 'tiny':
    v.update(image_size=64, dataset='embedded', eval_split='validation',
             batch_size=32, epochs=0, total_steps=300, warmup_epochs=0,
             warmup_steps=20, dtype='float32', checkpoint_every_steps=100,
             log_every_steps=50, eval_every_steps=100)
  c = ml_collections.ConfigDict()
  c.task = task
  c.variant = variant
  c.model = MODELS[variant]
  c.init_from = ml_collections.config_dict.placeholder(str)  # .pth or dir
  c.eval_only = False
  c.num_classes = 0                  # 0: from the dataset
  c.global_pool = v['global_pool']   # True: mean of patch tokens + fc_norm
  c.drop_path = v['drop_path']
  c.dtype = v['dtype']
  c.scan_blocks = False              # nn.scan over blocks (compile time)

  c.data = ml_collections.ConfigDict()
  c.data.name = v['dataset']
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.split = 'train'
  c.data.eval_split = v['eval_split']
  c.data.image_size = ml_collections.FieldReference(  # int or (H, W):
      v['image_size'], field_type=object)  # --config.data.image_size=(64,48)
  c.data.channels = 3                # 3: RGB; 1: grayscale (PIL 'L')
  c.data.mean = IMAGENET_MEAN        # per channel, of [0, 1] pixels:
  c.data.std = IMAGENET_STD          # --config.data.mean=(0.5,) for 1 channel
  c.data.augment = v['augment']
  c.data.on_error = 'skip'           # unreadable image files: 'skip' | 'fail'
  c.data.max_pixels = 89_478_485     # larger images are skipped (PIL's limit)
  c.data.shuffle_buffer = 10_000     # TFDS examples in the shuffle buffer
  c.data.repeats = ml_collections.config_dict.placeholder(int)  # copies of
                                     # each embedded photo per epoch; None:
                                     # an epoch of at least 256 examples
  c.data.image_key = 'image'         # TFDS feature names
  c.data.label_key = 'label'

  c.batch_size = v['batch_size']     # global batch of one micro-step
  c.accum_iter = 1
  c.blr = v['blr']                   # lr = blr * effective batch / 256
  c.min_lr = v['min_lr']
  c.weight_decay = v['weight_decay']
  c.layer_decay = v['layer_decay']   # fine-tuning only
  c.clip_grad = ml_collections.config_dict.placeholder(float)
  c.epochs = v['epochs']
  c.warmup_epochs = v['warmup_epochs']
  c.total_steps = v['total_steps']   # optimizer updates; > 0 overrides epochs
  c.warmup_steps = v['warmup_steps']
  c.mixup = v['mixup']               # Beta alpha; 0 disables
  c.cutmix = v['cutmix']
  c.mixup_prob = 1.0
  c.mixup_switch_prob = 0.5
  c.smoothing = v['smoothing']

  c.seed = 0
  c.mesh = (-1, 1)
  c.checkpoint_every_steps = v['checkpoint_every_steps']
  c.keep_checkpoints = 3
  c.log_every_steps = v['log_every_steps']
  c.eval_every_steps = v['eval_every_steps']
  c.resume_override = ''             # config fields a resumed run may change,
                                     # e.g. 'total_steps,epochs'
  c.lock()
  return c
