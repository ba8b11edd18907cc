"""Summarise DMVR shards: clips, frames per clip, resolution, labels, errors.

  python -m stat_jax.data.inspect_shards 'DIR/train.tfrecord@4' [--json] [--full]

A record counts as skipped when it fails to parse, has no frames, or one of
the checked frames fails to decode (first, middle, last; --full: all). With
--json the last line is a JSON object with clips, skipped, labels, frames,
resolutions and the first errors.
"""

import collections
import json

import numpy as np
import tensorflow as tf
from absl import app, flags

from stat_jax.data import dmvr
from stat_jax import cli
from stat_jax.checks.errors import UserError, report_user_errors

_MAX_ERRORS_LISTED = 20


def _check_frames(clip, full):
  """(height, width) of the clip; raises when a checked frame fails."""
  count = len(clip.frames)
  checked = range(count) if full else sorted({0, count // 2, count - 1})
  shapes = {tuple(tf.io.decode_jpeg(clip.frames[i], channels=3).shape[:2])
            for i in checked}
  if len(shapes) > 1:
    raise ValueError(f'frames differ in size: {sorted(shapes)}')
  return shapes.pop()


def inspect_spec(spec: str, full: bool = False) -> dict:
  """Statistics of every record of a shard spec (see the module doc)."""
  files = dmvr.resolve_spec(spec)
  lengths, labels, resolutions = [], collections.Counter(), collections.Counter()
  errors = []
  for path in files:
    number = 0
    try:
      for number, record in enumerate(dmvr.read_records(path)):
        try:
          clip = dmvr.parse_example(record)
          height, width = _check_frames(clip, full)
        except (ValueError, tf.errors.InvalidArgumentError) as e:
          errors.append(f'{path} record {number}: {str(e).splitlines()[0]}')
          continue
        lengths.append(len(clip.frames))
        resolutions[f'{height}x{width}'] += 1
        label = (clip.label_indices or clip.label_texts or ['none'])[0]
        labels[str(label)] += 1
    except tf.errors.OpError as e:  # the framing itself: not a TFRecord file
      raise UserError(f'{path}: not a TFRecord file, or corrupt after record '
                       f'{number}: {e.message.splitlines()[0]}') from e
  frames = ({'min': int(np.min(lengths)), 'median': float(np.median(lengths)),
             'max': int(np.max(lengths))} if lengths else {})
  return {'spec': spec, 'files': len(files), 'clips': len(lengths),
          'skipped': len(errors), 'frames': frames,
          'resolutions': dict(resolutions.most_common()),
          'labels': dict(sorted(labels.items(), key=lambda kv: _sort_key(kv[0]))),
          'errors': errors[:_MAX_ERRORS_LISTED]}


def _sort_key(label):
  return (0, int(label), '') if label.lstrip('-').isdigit() else (1, 0, label)


def _print_summary(stats):
  print(f"{stats['spec']}: {stats['files']} files, {stats['clips']} clips, "
        f"{stats['skipped']} skipped")
  if stats['frames']:
    f = stats['frames']
    print(f"frames per clip: min {f['min']}, median {f['median']}, "
          f"max {f['max']}")
  print('resolutions: ' + ', '.join(
      f'{r} ({n})' for r, n in stats['resolutions'].items()))
  print(f"labels ({len(stats['labels'])}): " + ', '.join(
      f'{label}: {n}' for label, n in stats['labels'].items()))
  for error in stats['errors']:
    print(f'  skipped {error}')


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_bool('json', False, 'End with one JSON line of the statistics.',
                  flag_values=FLAGS)
flags.DEFINE_bool('full', False, 'Decode every frame, not first/middle/last.',
                  flag_values=FLAGS)


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the shard spec ('prefix@N', a glob,
  or a comma list)."""
  if len(args) != 1:
    raise app.UsageError(f'give one shard spec, not {args}')
  return report_user_errors('stat_jax.data.inspect_shards', lambda: _inspect(args[0]))


def _inspect(spec: str) -> int:
  stats = inspect_spec(spec, FLAGS.full)
  _print_summary(stats)
  if FLAGS.json:
    print(json.dumps(stats))
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
