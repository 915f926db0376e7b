"""The PyTorch peer of the pretraining benchmarks: Hugging Face
transformers' ViTMAEForPreTraining of the same size as an mae_jax MAE (SDPA
attention, AdamW with betas 0.9/0.95, fused on CUDA; bf16 by
torch.autocast), as written or under torch.compile. Imported by
benchmarks/pretrain_throughput.py and benchmarks/profile_step.py; torch
and transformers are imported only when a peer is built.
"""
from mae_jax import MAE_CONFIGS


def peer_step(model_name, image_size, batch, dtype, chain=1, compiled=False):
  """A callable that runs `chain` train steps of the peer of `model_name`
  (an mae_jax.MAE_CONFIGS name) on one synthetic batch of `batch` images
  of `image_size` px, with bf16 autocast when dtype == 'bfloat16',
  torch.compile'd with `compiled`, and waits for the device at the end.
  Its `version` attribute is torch's."""
  import torch  # pylint: disable=import-outside-toplevel
  from transformers import ViTMAEConfig, ViTMAEForPreTraining  # pylint: disable=import-outside-toplevel
  c = MAE_CONFIGS[model_name]
  cfg = ViTMAEConfig(
      hidden_size=c['embed_dim'], num_hidden_layers=c['depth'],
      num_attention_heads=c['num_heads'], intermediate_size=4 * c['embed_dim'],
      decoder_hidden_size=c['decoder_embed_dim'],
      decoder_num_hidden_layers=c['decoder_depth'],
      decoder_num_attention_heads=c['decoder_num_heads'],
      decoder_intermediate_size=4 * c['decoder_embed_dim'],
      image_size=image_size, patch_size=c['patch_size'],
      layer_norm_eps=1e-6, mask_ratio=0.75, norm_pix_loss=True,
      hidden_act='gelu', qkv_bias=True, attn_implementation='sdpa')
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = ViTMAEForPreTraining(cfg).to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                          weight_decay=0.05, fused=device == 'cuda')
  forward = torch.compile(model) if compiled else model
  images = torch.randn(batch, 3, image_size, image_size, device=device)
  autocast = torch.autocast(device_type=device, dtype=torch.bfloat16,
                            enabled=dtype == 'bfloat16')
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def step():
    for _ in range(chain):
      with autocast:
        loss = forward(pixel_values=images).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
    sync()

  step.version = torch.__version__
  return step
