"""Fine-tuning and linear probing end to end on the embedded labelled task
(20 photographs, label = photo), and evaluation of a saved classifier."""
import pytest

from configs import finetune, linprobe
from mae_jax import classify

SHORT = dict(total_steps=4, warmup_steps=1, eval_every_steps=4,
             log_every_steps=2, checkpoint_every_steps=4, batch_size=16)


@pytest.mark.parametrize('module', [finetune, linprobe])
def test_short_run_then_eval_only_reproduces_accuracy(module, tmp_path):
  config = module.get_config('tiny')
  config.update_from_flattened_dict(SHORT)
  result = classify.train(config, str(tmp_path / 'run'))
  assert result['count'] == 20 and 0 <= result['top1'] <= result['top5']
  if module is finetune:   # a classifier directory initialises a new run
    again = module.get_config('tiny')
    again.update_from_flattened_dict(dict(SHORT, eval_only=True))
    again.init_from = str(tmp_path / 'run')
    assert classify.train(again, str(tmp_path / 'eval')) == result
