"""Speed of one config: time per clip, compile time, memory, FLOP/s, MFU.

  python benchmarks/speed.py --config=configs/k400.py:16 [--batch 1] \
      [--train] [--dtype bfloat16] [--json] [--profile] [--config.model.window=5]

Times the jitted forward pass (the eval step), or the whole train step with
--train, at the given batch; MFU is against a large matmul at the same dtype
timed in the same run (benchmarks/measure.py). --profile adds where the time
of one forward/train step goes, by kind of op (XLA:CPU only).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from benchmarks import measure, op_profile
from stat_jax.config_validation import validate

config_flags.DEFINE_config_file('config', None, 'Experiment config.')
flags.DEFINE_integer('batch', 1, 'Clips per step.')
flags.DEFINE_bool('train', False, 'Time the train step instead of the forward pass.')
flags.DEFINE_string('dtype', None, 'Compute dtype (default: the config\'s).')
flags.DEFINE_integer('repeats', 3, 'Timed runs; the fastest counts.')
flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
flags.DEFINE_bool('profile', False, 'Also print the time per kind of op.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  if FLAGS.dtype:
    config.dtype = FLAGS.dtype
  validate(config)
  label = os.path.basename(config_flags.get_config_filename(FLAGS['config']))
  row, program = measure.measure(config, batch=FLAGS.batch, train=FLAGS.train,
                                 repeats=FLAGS.repeats, label=label)
  if FLAGS.profile:
    row['profile'] = op_profile.breakdown(program)
  if FLAGS.json:
    print(json.dumps(row))  # the profile's Counters are dicts
    return
  print(measure.format_table([row]))
  if FLAGS.profile:
    print(op_profile.format_breakdown(row['profile']))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
