"""A tiny run directory with one checkpoint, for test_export.py and
test_predict.py: the tiny config with random parameters, saved the way
training saves. Every tensor is drawn (biases too, norm scales around 1), so
a mix-up of any two tensors changes the logits, and the logits depend
clearly on the input."""

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from stat_jax.data import dmvr
from stat_jax import checkpoint, optim, param_names
from stat_jax.train_state import ModelParts, TrainState

STEP = 5
STDDEV = {'kernel': 0.15, 'bias': 0.05}  # embeddings and tokens: 0.05


def random_params(parts: ModelParts, seed: int) -> nnx.State:
  rng = np.random.default_rng(seed)
  arrays = {}
  for path, variable in nnx.to_flat_state(parts.abstract_params):
    noise = rng.standard_normal(variable.get_value().shape).astype(np.float32)
    kind = path[-1]
    arrays[param_names.name_of(path)] = (
        1 + 0.2 * noise if kind == 'scale' else STDDEV.get(kind, 0.05) * noise)
  return param_names.from_named_arrays(arrays, parts.abstract_params, 'random')


def save_tiny_run(workdir: str, class_names=None, **data_overrides):
  """Writes `<workdir>/checkpoints/STEP`; returns the config it saved.
  With `class_names`, a label map of them (`<workdir>/label_map.txt`) is
  the run's."""
  if class_names is not None:
    os.makedirs(workdir, exist_ok=True)
    data_overrides['label_map'] = os.path.join(workdir, 'label_map.txt')
    dmvr.write_label_map(data_overrides['label_map'], class_names)
  config = tiny.get_config()
  config.data.update(data_overrides)
  parts, tx = ModelParts(config), optim.make_optimizer(config)
  params = random_params(parts, config.seed)
  state = TrainState(step=jnp.asarray(STEP, jnp.int32), params=params,
                     opt_state=tx.init(params))
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), 1)
  ckpt.save(STEP, state, {'epoch': 0, 'position': 0}, config)
  ckpt.wait()
  ckpt.close()
  return config
