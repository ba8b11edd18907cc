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

from data import records
from stat_jax import mixup, sharding, storage
from stat_jax.errors import UserError


def check_eval_spec(config: ml_collections.ConfigDict) -> None:
  """data.eval_spec (if set) names files that exist, can be read and hold
  records (the index evaluation builds anyway); the first evaluation would
  otherwise fail after eval_every steps."""
  spec = config.data.eval_spec
  if not spec:
    return
  try:
    records.RecordIndex(spec)
  except (UserError, FileNotFoundError) as error:
    raise UserError(f'config.data.eval_spec: {error}') from error
  except (tf.errors.OpError, ValueError) as error:
    raise UserError(f'config.data.eval_spec = {spec!r}: cannot be read: '
                    f'{getattr(error, "message", error)}') from error


def check_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """The batch splits over the devices of `mesh`: equally, each device's
  clips into config.grad_accum_steps micro-batches (each device splits its
  own rows), and into mixup pairs (stat_jax/mixup.py: each device's clips
  and data.repeated_augment must divide one another)."""
  sharding.check_batch(config.batch_size, mesh)
  per_device = config.batch_size // mesh.size
  if per_device % config.grad_accum_steps:
    raise UserError(
        f'config.grad_accum_steps={config.grad_accum_steps} does not divide '
        f'the {per_device} clips of each of the {mesh.size} devices '
        f'(batch_size {config.batch_size}): each device splits its own clips '
        'into the micro-batches')
  if mixup.mixes(config.mixup):
    mixup.check_pairing(per_device, config.data.repeated_augment)


def check_writable(directory: str) -> None:
  """Files can be created in `directory` (made if missing), where a run
  writes its checkpoints, logs and reports. Tried with a probe file, created
  and removed: the permission bits that os.access reads say yes to root, a
  read-only mount or a network file system may say otherwise, and a bucket
  answers for its own permissions (a missing bucket, missing credentials
  and a denied write all fail here, before anything compiles)."""
  try:
    storage.write_probe(directory)
  except (OSError, tf.errors.OpError) as error:
    raise UserError(f'{directory} is not writable ({storage.reason(error)});'
                    ' checkpoints, logs and reports are written there: give '
                    'a --workdir you can write to') from error


def check_before_training(config: ml_collections.ConfigDict) -> None:
  """Every pre-training check of this module, in order."""
  check_eval_spec(config)
