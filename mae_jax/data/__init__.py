"""Input pipeline in tf.data: the only package that imports TensorFlow.

Import it explicitly (`from mae_jax.data import pipeline`); `mae_jax` itself
never imports it, so models and trainer run where TensorFlow is absent.
"""
from mae_jax import extras

tf = extras.require('tensorflow', 'data', 'the tf.data input pipeline')

try:  # TensorFlow only decodes and augments; keep it off the accelerators.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # devices already initialised by an earlier TF user
  pass
