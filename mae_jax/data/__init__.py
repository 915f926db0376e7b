"""Input pipeline in tf.data: the only package that imports TensorFlow.

Import it explicitly (`from mae_jax.data import pipeline`); `mae_jax` itself
never imports it, so models and trainer run where TensorFlow is absent.
"""
from mae_jax import extras

# `import tensorflow` imports Keras' optimizers whenever Keras is installed
# (TensorFlow requires it), so that they register with SavedModel: about
# 2 s of every run's start-up, and pipelines that use tf.data and image ops
# only. TensorFlow skips that import when it fails.
with extras.imports_failing('keras.src.optimizers', 'tf_keras.src.optimizers'):
  tf = extras.require('tensorflow', 'data', 'the tf.data input pipeline')

try:  # TensorFlow only decodes and augments; keep it off the accelerators.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # devices already initialised by an earlier TF user
  pass
