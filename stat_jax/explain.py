"""Show what STAT sees: its attention on video files, from a checkpoint.

  python -m stat_jax.explain --workdir=runs/demo [--checkpoint=best] \
      --out=explain/ [--json] a.mp4 b.webm \
      cache/synthetic_motion/val.tfrecord-00000-of-00002:2

Each video is cut into the config's eval views (as predict does); the
first view is explained. An argument FILE:K is record K (from 0) of a
TFRecord file of DMVR shards, cut into views by the eval pipeline itself
(stat_jax/data/eval_pipeline.py eval_views): what evaluation scores, with no re-encoding
(a lossy codec at 32x32 changes what the demo model predicts; see
benchmarks/RESULTS.md, "What STAT sees"); its label is shown beside the
top-5. Per video it writes into --out:
  <name>.frames.png    frame-to-frame attention of every STA block (row i:
                       the mass frame i's queries put on frame j: j = i
                       through CA, neighbours through SA, all class tokens
                       through LA), CA / SA / LA shares in the titles;
  <name>.shares.png    the CA / SA / LA share by depth (the shrinking);
  <name>.timeline.png  the temporal aggregation's video class token on
                       each frame, under the frames (lta >= 1);
  <name>.spatial.png   the class token's CA weights over a few frames
                       (first STA block);
and one index.html showing them with the top-5 (view-averaged) classes.
With --json the last line is one JSON object {"videos": [{"video", "label"
(a record's, else null), "top5", "attention_mass": [{"ca", "sa", "la"} per
STA block], "timeline" (per token frame), "frame_times_s" (the time in the
video of each token frame's first input frame; null for a record)}],
"attention_mass": the first video's}. The pictures title each token frame
with that time.
"""

import html
import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf
from absl import flags

from stat_jax.data import dmvr, eval_pipeline, records
from stat_jax import attention_maps, cli, plots, storage
from stat_jax.deploy import inference, predict
from stat_jax.checks.errors import UserError

SPATIAL_FRAMES = 4  # frames of the spatial overlay


def record_argument(argument: str) -> tuple[str, int] | None:
  """(file, K) when `argument` is FILE:K, record K of an existing file (and
  no file is named `argument` itself); None for a video file."""
  path, colon, index = argument.rpartition(':')
  if colon and index.isdigit() and not tf.io.gfile.isdir(path) and (
      tf.io.gfile.exists(path)) and not tf.io.gfile.exists(argument):
    return path, int(index)
  return None


def record_views(path: str, index: int, data, classes: list[str]):
  """(uint8 views [V, T, crop, crop, 3] as evaluation cuts them, the
  record's label: its text, else the class of its index, else None)."""
  try:
    shard = records.RecordIndex(path)  # a header scan: reads record K only
  except ValueError as error:  # UserError too: an empty file
    raise UserError(f'{path}: not a TFRecord file ({error})') from error
  if index >= len(shard):
    raise UserError(f'{path} holds no record {index} (records count from 0; '
                    f'it has {len(shard)})')
  try:
    parsed = dmvr.parse_tf(tf.constant(shard.read(index)))
  except tf.errors.InvalidArgumentError as error:
    raise UserError(f'record {index} of {path} is not a clip: '
                    f'{error.message}') from error
  texts = [t.decode('utf-8', 'replace') for t in parsed['label_text'].numpy()]
  names = [classes[i] for i in parsed['label_index'].numpy()
           if 0 <= i < len(classes)]
  return (eval_pipeline.eval_views(parsed, data).numpy(),
          ', '.join(texts or names) or None)


def explain_video(restored, apply, path: str) -> dict:
  """Runs the capture on the eval views of `path` (a video file or FILE:K,
  record_argument): {'video', 'label', 'top5', 'summary' (first view,
  numpy), 'frames' uint8 [T, crop, crop, 3], 'times' float [T] (s, in the
  video; None for a record)}."""
  record = record_argument(path)
  if record:
    views, label = record_views(*record, restored.config.data,
                                restored.classes)
    times = None
  else:  # views [V, T, c, c, 3], times [clips, T]; view 0 is of clip 0
    views, times = predict.sampled_views(path, restored.config.data)
    label, times = None, times[0]
  logits, summary = apply(restored.params, views)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1)).mean(axis=0)
  best = np.argsort(-probs, kind='stable')[:5]
  summary = jax.tree.map(np.asarray, summary)
  first = {'frame_maps': summary['frame_maps'][:, 0],  # [L, nt, nt]
           'shares': summary['shares'][:, 0],  # [L, 3]
           'cls_ca': [grid[0] for grid in summary['cls_ca']]}  # [nt, kh, kw]
  if 'timeline' in summary:
    first['timeline'] = summary['timeline'][0]  # [nt]
  return {'video': path, 'label': label, 'frames': views[0], 'times': times,
          'summary': first,
          'top5': [[restored.classes[i], float(probs[i])] for i in best]}


def token_frames(frames, nt: int):
  """The input frame shown for each token frame (first of its group); works
  on the times [T] too."""
  return frames[::len(frames) // nt][:nt]


def frame_titles(result: dict, nt: int) -> list[str]:
  """'frame i', and for a video file the time of its shown frame."""
  if result['times'] is None:
    return [f'frame {i}' for i in range(nt)]
  return [f'frame {i}, {t:.2f} s'
          for i, t in enumerate(token_frames(result['times'], nt))]


def write_pictures(result: dict, out: str, stem: str) -> list[str]:
  """The PNGs of one video; returns their file names."""
  summary, frames = result['summary'], result['frames']
  nt = summary['frame_maps'].shape[-1]
  shown, titles = token_frames(frames, nt), frame_titles(result, nt)
  figures = {
      'frames': plots.frame_maps_figure(summary['frame_maps'],
                                        summary['shares']),
      'shares': plots.shares_figure(summary['shares']),
  }
  if 'timeline' in summary:
    figures['timeline'] = plots.timeline_figure(shown, summary['timeline'],
                                                titles)
  picked = np.linspace(0, nt - 1, min(SPATIAL_FRAMES, nt)).round().astype(int)
  figures['spatial'] = plots.cls_overlay_figure(
      shown[picked], summary['cls_ca'][0][picked],
      [titles[i] for i in picked], block=1)
  names = []
  for kind, fig in figures.items():
    names.append(f'{stem}.{kind}.png')
    plots.save(fig, storage.join(out, names[-1]))
  return names


def masses(summary: dict) -> list[dict]:
  return [dict(zip(attention_maps.SHARES, map(float, row)))
          for row in summary['shares']]


def write_index(entries: list[tuple[dict, list[str]]], out: str) -> str:
  """index.html: per video its top-5 and pictures."""
  parts = ['<!doctype html><meta charset="utf-8"><title>STAT explain</title>',
           '<h1>What STAT sees</h1>']
  for result, images in entries:
    top = ''.join(f'<li>{html.escape(name)} {prob:.3f}</li>'
                  for name, prob in result['top5'])
    label = (f'<p>label: {html.escape(result["label"])}</p>'
             if result['label'] else '')
    shares = ', '.join(f'block {i + 1}: ' + ' '.join(
        f'{k.upper()} {v:.2f}' for k, v in m.items())
                       for i, m in enumerate(masses(result['summary'])))
    parts += [f'<h2>{html.escape(result["video"])}</h2>{label}<ol>{top}</ol>',
              f'<p>attention mass: {html.escape(shares)}</p>']
    parts += [f'<img src="{html.escape(name)}" alt="{html.escape(name)}">'
              for name in images]
  path = storage.join(out, 'index.html')
  storage.write_text(path, '\n'.join(parts) + '\n')
  return path


def explain(workdir: str, which: str, out: str, videos: list[str]) -> list[dict]:
  """Writes the pictures and index.html; returns the JSON results."""
  restored = inference.restore(workdir, which)
  if restored.config.model.arch != 'stat':
    raise UserError(f'{workdir} is a run of model.arch = '
                    f'{restored.config.model.arch!r}; explain shows STAT\'s '
                    'attention (STA) only')
  apply = jax.jit(attention_maps.capture_fn(restored.parts,
                                            restored.config.data))
  storage.make_folder(out)
  entries, results = [], []
  for index, path in enumerate(videos):
    result = explain_video(restored, apply, path)
    name = storage.basename(path)
    stem = f'{index:02d}_' + (name.replace(':', '_') if record_argument(path)
                              else storage.strip_extension(name))
    entries.append((result, write_pictures(result, out, stem)))
    summary, times = result['summary'], result['times']
    nt = summary['frame_maps'].shape[-1]
    results.append({'video': path, 'label': result['label'],
                    'top5': result['top5'],
                    'attention_mass': masses(summary),
                    'timeline': summary['timeline'].tolist()
                                if 'timeline' in summary else None,
                    'frame_times_s': None if times is None
                                     else token_frames(times, nt).tolist()})
  write_index(entries, out)
  return results


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('workdir', None, 'Training run directory.',
                    flag_values=FLAGS)
flags.mark_flag_as_required('workdir', flag_values=FLAGS)
flags.DEFINE_string('checkpoint', 'latest',
                    "'latest', 'best' or a step number.", flag_values=FLAGS)
flags.DEFINE_string('out', 'explain', 'Folder for the PNGs and index.html.',
                    flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'End with one JSON line of the results.',
                  flag_values=FLAGS)

_PROGRAM = 'stat_jax.explain'


def _explain(videos: list[str]) -> int:
  results = explain(FLAGS.workdir, FLAGS.checkpoint, FLAGS.out, videos)
  for result in results:
    label = f' (label {result["label"]})' if result['label'] else ''
    print(f'{result["video"]}{label}: ' + ', '.join(
        f'{name} {prob:.3f}' for name, prob in result['top5'][:3]))
    print('  CA/SA/LA by block: ' + '  '.join(
        '/'.join(f'{m[k]:.2f}' for k in attention_maps.SHARES)
        for m in result['attention_mass']))
  print(f'Pictures: {storage.join(FLAGS.out, "index.html")}', flush=True)
  if FLAGS.json:
    print(json.dumps({'videos': results,
                      'attention_mass': results[0]['attention_mass']}))
  return 0


def run(videos: list[str]) -> int:
  return cli.run_on_videos(_PROGRAM, _explain, videos)


def main(argv: list[str]) -> int:
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
