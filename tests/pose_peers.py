"""Hugging Face transformers' ViTPose as the test peer: small random
VitPoseForPoseEstimation models at 256 x 192 and their save_pretrained
directories."""
import numpy as np
import torch
from transformers import (VitPoseBackboneConfig, VitPoseConfig,
                          VitPoseForPoseEstimation)

WIDTH, DEPTH, HEADS = 64, 2, 2
# The geometry of the registry's vitpose_tiny_patch8 (an official-layout
# file of it is recognised by its tensors).
REGISTRY_TINY = dict(image_size=[128, 96], patch_size=[8, 8], hidden_size=192,
                     num_hidden_layers=4, num_attention_heads=3)


def hf_vitpose(simple, seed=0, layer_norm_eps=1e-6, num_experts=1,
               geometry=None):
  """A random VitPoseForPoseEstimation (eval mode), 17 joints; by default
  256 x 192, patch 16, width 64, depth 2; `geometry` (e.g. REGISTRY_TINY)
  replaces those fields. Weights are drawn wider than transformers' init
  (std 0.02 leaves heatmaps near 0) and the classic head's BatchNorm
  statistics are random, so every tensor matters in a comparison."""
  torch.manual_seed(seed)
  geometry = geometry or dict(hidden_size=WIDTH, num_hidden_layers=DEPTH,
                              num_attention_heads=HEADS)
  backbone = VitPoseBackboneConfig(
      out_indices=[geometry['num_hidden_layers']],
      layer_norm_eps=layer_norm_eps, num_experts=num_experts,
      part_features=16, **geometry)
  model = VitPoseForPoseEstimation(VitPoseConfig(
      backbone_config=backbone, use_simple_decoder=simple, num_labels=17))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim > 1:
        p.normal_(0, 0.1)
      else:
        p.uniform_(-0.5, 0.5) if 'bias' in name else p.uniform_(0.5, 1.5)
    for name, buf in model.named_buffers():
      if name.endswith('running_mean'):
        buf.normal_(0, 0.5)
      elif name.endswith('running_var'):
        buf.uniform_(0.5, 2.0)
      elif name.endswith('num_batches_tracked'):
        buf.fill_(1234)
  return model.eval()


def save_hf_vitpose(directory, simple, **kwargs):
  """save_pretrained of `hf_vitpose(simple, **kwargs)` into `directory`;
  returns the torch model."""
  model = hf_vitpose(simple, **kwargs)
  model.save_pretrained(str(directory))
  return model


def hf_heatmaps(model, nhwc):
  """HF heatmaps of NHWC float32 inputs, as NHWC NumPy."""
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(
        nhwc.transpose(0, 3, 1, 2)))).heatmaps
  return out.numpy().transpose(0, 2, 3, 1)
