"""`config.init_from`: start from another run's parameters (e.g. K400 -> SSv2).

Parameters are matched by their path in the model; a parameter whose shape
differs (the classifier when the class count changes) keeps its fresh
initialisation. What was loaded, re-initialised or left unused is reported.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from flax import nnx

from stat_jax import param_names, storage


def _flatten(tree) -> dict:
  """{dotted name: array}; the NNX variables of `params` and the nested
  dicts a checkpoint restores to get the same names."""
  return {param_names.name_of(path).removesuffix('.value'): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _latest_state_dir(source: str) -> str:
  """A run workdir, its checkpoints/ dir, or one step dir -> the state item."""
  for candidate in (source, storage.join(source, 'checkpoints')):
    if tf.io.gfile.isdir(storage.join(candidate, 'state')):
      return storage.join(candidate, 'state')
    # GCS lists folders with a trailing '/'
    names = (tf.io.gfile.listdir(candidate)
             if tf.io.gfile.isdir(candidate) else [])
    steps = [int(name.rstrip('/')) for name in names
             if name.rstrip('/').isdigit()]
    if steps:
      return storage.join(candidate, str(max(steps)), 'state')
  raise FileNotFoundError(f'config.init_from={source!r}: no checkpoint found '
                          '(expected a workdir, its checkpoints/ or a step dir)')


def load_pretrained(source: str, params: nnx.State, log=print) -> nnx.State:
  """`params` with every same-path, same-shape parameter taken from source."""
  path = _latest_state_dir(source)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.restore(path)
  saved = _flatten(saved['params'])
  ours = _flatten(params)
  loaded, reinitialised = [], []
  new_leaves = []
  for name, leaf in ours.items():
    source_leaf = saved.get(name)
    if source_leaf is not None and np.shape(source_leaf) == leaf.shape:
      loaded.append(name)
      new_leaves.append(jax.device_put(np.asarray(source_leaf, leaf.dtype),
                                       leaf.sharding))
    else:
      reinitialised.append(name)
      new_leaves.append(leaf)
  unused = sorted(set(saved) - set(ours))
  log(f'init_from {path}: loaded {len(loaded)} parameters; re-initialised '
      f'{len(reinitialised)}: {", ".join(reinitialised) or "none"}; unused '
      f'{len(unused)}: {", ".join(unused) or "none"}')
  return jax.tree.unflatten(jax.tree.structure(params), new_leaves)
