"""Input pipeline in tf.data: the only package that imports TensorFlow.

Import it explicitly (`from mae_jax.data import pipeline`); `mae_jax` itself
never imports it, so models and trainer run where TensorFlow is absent.
"""
import sys

from mae_jax import extras

# `import tensorflow` imports Keras' optimizers whenever Keras is installed
# (TensorFlow requires it), so that they register with SavedModel: about
# 2 s of every run's start-up, and pipelines that use tf.data and image ops
# only. TensorFlow skips that import when it fails, so it is made to fail
# while TensorFlow is first imported; Keras imports normally afterwards.
_KERAS_EAGER = ('keras.src.optimizers', 'tf_keras.src.optimizers')


def _import_tensorflow():
  if 'tensorflow' in sys.modules or 'keras' in sys.modules:
    return extras.require('tensorflow', 'data', 'the tf.data input pipeline')
  for name in _KERAS_EAGER:
    sys.modules[name] = None  # makes `import name` raise ImportError
  try:
    return extras.require('tensorflow', 'data', 'the tf.data input pipeline')
  finally:
    for name in _KERAS_EAGER:
      del sys.modules[name]


tf = _import_tensorflow()

try:  # TensorFlow only decodes and augments; keep it off the accelerators.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # devices already initialised by an earlier TF user
  pass
