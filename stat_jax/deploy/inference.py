"""A trained checkpoint as a video classifier (shared by export and predict).

`restore(workdir)` reads the config a run saved with its checkpoint and the
parameters (optimizer state is restored too, then dropped), and turns on
the run's compilation cache (stat_jax/compile_cache.py); `serving_fn`
is the one function every export format serves:

  uint8 RGB video [B, T, H, W, 3] -> (logits, probabilities) [B, classes]

with the normalisation of stat_jax/augment_device.py inside, the model in eval mode
(no dropout, no drop path), float32 compute whatever `config.dtype` the run
trained with, and the portable 'xla' attention (model.attention_impl).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import tensorflow as tf
from flax import nnx

from stat_jax.data import labels
from stat_jax import augment_device, checkpoint, compile_cache, defaults
from stat_jax import sharding
from stat_jax.checks.config import validate
from stat_jax.train_state import ModelParts, abstract_train_state, with_shardings


@dataclasses.dataclass(frozen=True)
class Restored:
  config: ml_collections.ConfigDict  # the run's, set up for inference
  parts: ModelParts
  params: nnx.State
  step: int
  classes: list[str]  # class names, index = label

  @functools.cached_property
  def apply(self):
    """Jitted serving_fn: (params, uint8 video) -> (logits, probabilities)."""
    return jax.jit(serving_fn(self.parts, self.config.data))

  def classify(self, video):
    """uint8 video [B, T, H, W, 3] -> (logits, probabilities) [B, classes]."""
    return self.apply(self.params, video)


def serving_fn(parts: ModelParts, data):
  """apply(params, video uint8 [B, T, H, W, 3]) -> (logits, probabilities)."""

  def apply(params, video):
    model = nnx.merge(parts.eval_graph, params, parts.fresh_rngs())
    logits = model(augment_device.normalise(video, data))
    logits = logits.astype(jnp.float32)  # [B, classes]
    return logits, jax.nn.softmax(logits, axis=-1)

  return apply


def saved_config(ckpt: checkpoint.Checkpointer,
                 step: int) -> ml_collections.ConfigDict:
  """The config a run saved with checkpoint `step`, over today's defaults:
  keys added since the run was saved take them."""
  saved = ckpt.restore_config(step)
  config = defaults.base_config(saved['data']['num_frames'],
                              saved['model']['num_classes'])
  config.update(saved)  # JSON lists become the defaults' tuples
  validate(config)
  return config


def restore(workdir: str, which: str = 'latest') -> Restored:
  """The parameters of checkpoint `which` ('latest', 'best' or a step) of a
  training run directory, on one device, with the run's config."""
  directory = checkpoint.checkpoint_dir(workdir)
  if not tf.io.gfile.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {directory}: --workdir must be '
                            'the directory of a training run')
  ckpt = checkpoint.Checkpointer(directory, 1, read_only=True)

  def attempt(step):  # a corrupt 'latest' falls back to the step before
    config = saved_config(ckpt, step)
    compile_cache.enable(config)
    config.dtype = 'float32'
    config.remat = False
    config.model.attention_impl = 'xla'  # no cuDNN custom call: runs anywhere
    config.mesh.data, config.mesh.fsdp, config.mesh.slices = 1, 1, 1
    mesh = sharding.make_mesh(config, jax.local_devices()[:1])
    parts, _, abstract, shardings = abstract_train_state(config, mesh)
    state = ckpt.restore_state(step, with_shardings(abstract, shardings))
    return config, parts, state

  step, (config, parts, state) = ckpt.newest_whole(which, attempt)
  ckpt.close()
  params = jax.device_put(state.params, jax.local_devices()[0])  # mesh-free
  return Restored(config, parts, params, step, labels.class_names(config))
