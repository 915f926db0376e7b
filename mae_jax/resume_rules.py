"""Resuming from a checkpoint: which config fields may differ from the
ones it was written with.

Resuming is deny-by-default: every config field must equal the one the
checkpoint was written with, except NOT_TRAJECTORY, which change how a run
is executed, logged, evaluated or saved but not the updates it computes
(mesh and attention kernels change float rounding only; skip_nonfinite and
data.on_error only act on a failure, and are how one answers it). Anything
else (recipe, schedule, data, model, dtype) needs config.resume_override.
"""
import json

from mae_jax.errors import ConfigError
from mae_jax.schema import flat_fields, resume_overrides

NOT_TRAJECTORY = ('log_every_steps', 'checkpoint_every_steps',
                  'keep_checkpoints', 'figure_every_steps',
                  'eval_every_steps', 'eval_only', 'data.eval_split', 'mesh',
                  'attention', 'split_qkv', 'remat', 'fuse_patch_gather',
                  'skip_nonfinite',
                  'data.on_error', 'resume_override', 'knn_k',
                  'knn_temperature', 'knn_pool', 'knn_bank_size')
# Saved model fields that mirror a NOT_TRAJECTORY config field.
_MODEL_NOT_TRAJECTORY = ('fuse_patch_gather',)


def check_resume(config, saved_config, model, saved_model, where):
  """Compares a run with the checkpoint at `where` (its saved config and
  model description, JSON dicts) before it is restored.

  Every config field must be equal, except NOT_TRAJECTORY and the fields
  named in config.resume_override; fields absent from either side (added
  to the configs after the checkpoint was written) are not compared.
  Raises ConfigError naming every differing field; returns one
  'FIELD: OLD -> NEW' string per difference resume_override allowed.
  """
  now = flat_fields(json.loads(config.to_json()))
  then = flat_fields(saved_config)
  allowed = resume_overrides(config)
  differ = [k for k in now if k in then and then[k] != now[k]
            and k not in NOT_TRAJECTORY]
  overridden = [f'{k}: {then[k]!r} -> {now[k]!r}' for k in differ
                if k in allowed]
  diffs = [f'{k}={then[k]!r} (checkpoint) != {now[k]!r} (now)'
           for k in differ if k not in allowed]
  if not diffs:  # same config fields; the module itself may still differ
    fields = json.loads(json.dumps(model))
    diffs = [f'model.{k}={v!r} (checkpoint) != {fields["fields"].get(k)!r} '
             '(now)' for k, v in saved_model.get('fields', {}).items()
             if fields['fields'].get(k) != v
             and k not in _MODEL_NOT_TRAJECTORY]
    if saved_model.get('class') != fields['class']:
      diffs.insert(0, f'model class {saved_model.get("class")!r} '
                   f'(checkpoint) != {fields["class"]!r} (now)')
  if diffs:
    raise ConfigError(
        f'checkpoint {where} was written by another config: '
        f'{"; ".join(diffs)}; resuming would change the run. Use its config, '
        'another --workdir, or allow the change with '
        '--config.resume_override=FIELD[,FIELD...]')
  return overridden
