"""How time and memory per clip grow with the clip length T: STAT against a
joint space-time attention baseline of the same width.

  python -m benchmarks.scaling [--frames 16,32,64] [--joint_frames 16,32] \
      [--joint_memory_frames 64] [--train] [--dtype bfloat16] [--json]

STAT rows are the paper's configs (configs/k400.py:T, window 3 / 5 / 7). The
joint baseline is the same network with the window covering every frame
(`to` = 2 nt - 1), no short-term pooling (sa_pool = 1) and no K/V pooling
(kv_stride = 1): every query attends every token of the clip. Its window
table also lists the neighbours outside the clip (masked), so it computes
about twice the attention it needs: the contrast is in the growth. Joint
rows for --joint_memory_frames are only compiled (joint T=64 is too slow
and too large to run on a small CPU): XLA's memory plan is all they show.
Timing and memory: benchmarks/measure.py.
"""

import json

from absl import flags

from benchmarks import measure
from configs import k400
from stat_jax import arch, cli
from stat_jax.checks.errors import report_user_errors
from stat_jax.checks.config import validate

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_list('frames', ['16', '32', '64'], 'Clip lengths of the STAT rows.',
                  flag_values=FLAGS)
flags.DEFINE_list('joint_frames', ['16', '32'], 'Joint baseline rows, timed.',
                  flag_values=FLAGS)
flags.DEFINE_list('joint_memory_frames', [],
                  'Joint baseline rows, compiled for their memory plan only '
                  '(e.g. 64 on a GPU; XLA:CPU plans leave out temporaries).',
                  flag_values=FLAGS)
flags.DEFINE_integer('batch', 1, 'Clips per step.', flag_values=FLAGS)
flags.DEFINE_bool('train', False, 'Time the train step instead of the forward '
                  'pass.', flag_values=FLAGS)
flags.DEFINE_string('dtype', 'float32', 'Compute dtype.', flag_values=FLAGS)
flags.DEFINE_integer('repeats', 3, 'Timed runs; the fastest counts.',
                     flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'Print JSON lines instead of a table.',
                  flag_values=FLAGS)


def stat_config(frames: str):
  config = k400.get_config(frames)
  config.dtype = FLAGS.dtype
  return config


def joint_config(frames: str):
  """STAT's blocks with every query attending every token of the clip."""
  config = stat_config(frames)
  nt = arch.token_grid(config)[0]
  config.model.window = 2 * nt - 1  # frame 0 reaches frame nt - 1
  config.model.sa_pool = 1
  config.model.kv_stride = 1
  return config


def rows():
  """(label, config, timed?) of every row, in table order."""
  for frames in FLAGS.frames:
    yield f'STAT to={stat_config(frames).model.window}', stat_config(frames), True
  for frames in FLAGS.joint_frames:
    yield 'joint space-time', joint_config(frames), True
  for frames in FLAGS.joint_memory_frames:
    yield 'joint (compile only)', joint_config(frames), False


def with_growth(table: list[dict]) -> list[dict]:
  """Add each row's time and memory relative to the shortest clip of its kind."""
  first = {}
  for row in table:
    base = first.setdefault(row['label'].split(' ')[0], row)
    for key in ('ms_per_clip', 'rss_growth_gib'):
      ok = row[key] is not None and base[key] is not None
      row[f'{key}_vs_first'] = row[key] / base[key] if ok else None
  return table


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('benchmarks.scaling', _scaling)


def _scaling() -> int:
  table = []
  for label, config, timed in rows():
    validate(config)
    row, _ = measure.measure(config, batch=FLAGS.batch, train=FLAGS.train,
                             repeats=FLAGS.repeats, label=label, run=timed)
    table.append(row)
  table = with_growth(table)
  if FLAGS.json:
    for row in table:
      print(json.dumps(row))
    return 0
  print(measure.format_table(table))
  print('\ngrowth against the shortest clip of each kind:')
  for row in table:
    time_x = row['ms_per_clip_vs_first']
    memory_x = row['rss_growth_gib_vs_first']
    print(f'  {row["label"]:24s} T={row["frames"]:<3d} time '
          f'{"n/a" if time_x is None else f"{time_x:.2f}x":>6s}  memory '
          f'{"n/a" if memory_x is None else f"{memory_x:.2f}x":>6s}')
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
