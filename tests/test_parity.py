"""fp32 parity of converted weights with the PyTorch reference (CPU)."""
import pytest
from tests.torch_mae import classifier_parity, mae_parity

PRED_ATOL = 1e-4
LOSS_RTOL = 1e-5
LOGIT_ATOL = 1e-4


def _check(result):
  for flag, r in result.items():
    assert r['mask_equal'], f'masks differ (norm_pix_loss={flag})'
    assert r['pred_max_abs'] <= PRED_ATOL, (flag, r)
    assert r['loss_rel'] <= LOSS_RTOL, (flag, r)


def test_mae_base_parity_norm_pix_on_and_off():
  result = mae_parity('base_patch16', batch=2, norm_pix_values=(False, True))
  _check(result)
  assert abs(result[False]['loss'] - result[True]['loss']) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize('size', ['large_patch16', 'huge_patch14'])
def test_mae_large_huge_parity(size):
  _check(mae_parity(size, batch=2, norm_pix_values=(True,)))


@pytest.mark.parametrize('size,global_pool', [
    ('base_patch16', True), ('tiny_patch8', True), ('tiny_patch8', False)])
def test_classifier_parity(size, global_pool):
  assert classifier_parity(size, global_pool) <= LOGIT_ATOL
