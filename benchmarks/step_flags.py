"""Command-line flags that choose the program a benchmark compiles: the
config (`--config=configs/k400.py:16`, any `--config.x=y` override), the
batch, forward or train step, and the compute dtype. speed.py and
roofline.py define them here.
"""

import os

from absl import flags
import ml_collections
from ml_collections import config_flags

from stat_jax.config_validation import validate

config_flags.DEFINE_config_file('config', None, 'Experiment config.')
flags.DEFINE_integer('batch', 1, 'Clips per step.')
flags.DEFINE_bool('train', False, 'The train step instead of the forward pass.')
flags.DEFINE_string('dtype', None, 'Compute dtype (default: the config\'s).')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


def config() -> ml_collections.ConfigDict:
  """--config with --dtype applied, validated."""
  chosen = FLAGS.config
  if FLAGS.dtype:
    chosen.dtype = FLAGS.dtype
  validate(chosen)
  return chosen


def config_label() -> str:
  """The config file's name, for tables: 'k400.py'."""
  return os.path.basename(config_flags.get_config_filename(FLAGS['config']))
