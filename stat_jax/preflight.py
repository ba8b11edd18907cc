"""What can be checked before the first train step is checked there.

A fault found after training started costs the steps since the last
checkpoint (and, before, the checkpoint being written: trainer.py now
waits for it). `check_before_training(config)` runs every check of this
module before the train step is compiled; each raises a UserError that
names the input and what is wrong. Add a check as one function here and
one call in check_before_training.
"""

import ml_collections
import tensorflow as tf

from data import dmvr
from stat_jax.errors import UserError


def check_eval_spec(config: ml_collections.ConfigDict) -> None:
  """data.eval_spec (if set) names files that exist and are not empty;
  the first evaluation would otherwise fail after eval_every steps."""
  spec = config.data.eval_spec
  if not spec:
    return
  try:
    files = dmvr.resolve_spec(spec)
  except FileNotFoundError as error:
    raise UserError(f'config.data.eval_spec: {error}') from error
  try:
    sizes = [tf.io.gfile.stat(f).length for f in files]
    with tf.io.gfile.GFile(files[0], 'rb') as f:
      f.read(16)
  except tf.errors.OpError as error:
    raise UserError(f'config.data.eval_spec = {spec!r}: cannot be read: '
                    f'{error.message}') from error
  if not any(sizes):
    raise UserError(f'config.data.eval_spec = {spec!r}: every file is empty '
                    f'({files[0]}, ...); there is nothing to evaluate on')


def check_before_training(config: ml_collections.ConfigDict) -> None:
  """Every pre-training check of this module, in order."""
  check_eval_spec(config)
