"""Command-line flags that choose the program a benchmark compiles: the
config (`--config=configs/k400.py:16`, any `--config.x=y` override), the
batch, forward or train step, and the compute dtype. speed.py and
roofline.py define them on their own FlagValues with `define`.
"""

import os

from absl import flags
import ml_collections
from ml_collections import config_flags

from stat_jax.checks.config import validate


def define(flag_values: flags.FlagValues) -> None:
  """Adds --config, --batch, --train and --dtype to a tool's flags."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config.',
                                  flag_values=flag_values)
  flags.DEFINE_integer('batch', 1, 'Clips per step.', flag_values=flag_values)
  flags.DEFINE_bool('train', False, 'The train step instead of the forward '
                    'pass.', flag_values=flag_values)
  flags.DEFINE_string('dtype', None, "Compute dtype (default: the config's).",
                      flag_values=flag_values)
  flags.mark_flags_as_required(['config'], flag_values=flag_values)


def config(flag_values: flags.FlagValues) -> ml_collections.ConfigDict:
  """--config with --dtype applied, validated."""
  chosen = flag_values.config
  if flag_values.dtype:
    chosen.dtype = flag_values.dtype
  validate(chosen)
  return chosen


def config_label(flag_values: flags.FlagValues) -> str:
  """The config file's name, for tables: 'k400.py'."""
  return os.path.basename(
      config_flags.get_config_filename(flag_values['config']))
