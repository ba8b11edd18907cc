"""Speed of one config: time per clip, compile time, memory, FLOP/s, MFU.

  python -m benchmarks.speed --config=configs/k400.py:16 [--batch 1] \
      [--train] [--dtype bfloat16] [--json] [--profile] [--config.model.window=5]

Times the jitted forward pass (the eval step), or the whole train step with
--train, at the given batch; MFU is against a large matmul at the same dtype
timed in the same run (benchmarks/measure.py). --profile adds where the time
of one forward/train step goes, by kind of op (XLA:CPU only).
"""

import json

from absl import flags

from benchmarks import measure, op_profile, step_flags
from stat_jax import cli
from stat_jax.checks.errors import report_user_errors

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
step_flags.define(FLAGS)
flags.DEFINE_integer('repeats', 3, 'Timed runs; the fastest counts.',
                     flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.',
                  flag_values=FLAGS)
flags.DEFINE_bool('profile', False, 'Also print the time per kind of op.',
                  flag_values=FLAGS)


def _speed() -> int:
  row, program = measure.measure(step_flags.config(FLAGS), batch=FLAGS.batch,
                                 train=FLAGS.train, repeats=FLAGS.repeats,
                                 label=step_flags.config_label(FLAGS))
  if FLAGS.profile:
    row['profile'] = op_profile.breakdown(program)
  if FLAGS.json:
    print(json.dumps(row))  # the profile's Counters are dicts
    return 0
  print(measure.format_table([row]))
  if FLAGS.profile:
    print(op_profile.format_breakdown(row['profile']))
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  cli.no_positional(cli.parse_with_config(FLAGS, argv))
  return report_user_errors('benchmarks.speed', _speed)


if __name__ == '__main__':
  cli.run_with_config(main)
