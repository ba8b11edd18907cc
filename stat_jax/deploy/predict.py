"""Classify video files with a trained run or with an export of one.

  python -m stat_jax.deploy.predict --workdir=runs/k400_16 \
      [--checkpoint=best] a.mp4 b.webm
  python -m stat_jax.deploy.predict --export_dir=exports/k400_16 \
      [--format=onnx] a.avi --json

Each video is decoded with PyAV (any container and codec FFmpeg reads),
its short side resized to data.eval_short_side, and cut into the eval views
of the run's config with stat_jax/data/sampling.py (num_clips x num_crops clips of T
frames); the class probabilities are averaged over the views, as eval.py
does. Prints the top-k classes of each video, or with --json one JSON list.
A file that cannot be read is reported and skipped; the exit code is then 1.

With --window_s (and --stride_s, --timeline, --overlay) a window slides over
a long video instead: stat_jax/deploy/long_video.py.

  python -m stat_jax.deploy.predict --workdir=runs/mvit_b_16 \
      --clip_npy clip.npy --json

runs the model on clips already preprocessed as its input (float32
[B, T, H, W, 3], resized, cropped and normalised) and prints the raw logits,
{"logits": [[...], ...]}: for feature checks and for comparing the model
with other frameworks.
"""

import dataclasses
import json
import os
import sys
from collections.abc import Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

import jax  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np
import onnxruntime
import tensorflow as tf
from absl import flags
from flax import nnx

from stat_jax.data import convert, sampling
from stat_jax import cli, defaults, storage
from stat_jax.deploy import inference, long_video
from stat_jax.checks.errors import UserError, report_user_errors

# Export formats predict can run, in the order --format defaults to them.
EXPORT_FORMATS = ('stablehlo', 'onnx', 'savedmodel')


@dataclasses.dataclass(frozen=True)
class Classifier:
  data: ml_collections.ConfigDict  # the run's data config: views, shapes
  classes: list[str]
  # uint8 views [V, T, crop, crop, 3] -> probabilities float32 [V, classes]
  probabilities: Callable[[np.ndarray], np.ndarray]


def from_workdir(workdir: str, which: str = 'latest') -> Classifier:
  restored = inference.restore(workdir, which)
  return Classifier(restored.config.data, restored.classes,
                    lambda views: np.asarray(restored.classify(views)[1]))


def _stablehlo_runner(path):
  with tf.io.gfile.GFile(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return lambda views: np.asarray(exported.call(views)[1])


def _onnx_runner(path):
  with tf.io.gfile.GFile(path, 'rb') as f:  # local or gs://
    model = f.read()
  session = onnxruntime.InferenceSession(model,
                                         providers=['CPUExecutionProvider'])
  return lambda views: session.run(['probabilities'], {'video': views})[0]


def _savedmodel_runner(path):
  loaded = tf.saved_model.load(path)  # the signature needs it alive

  def run(views):
    outputs = loaded.signatures['serving_default'](video=tf.constant(views))
    return outputs['probabilities'].numpy()

  return run


_RUNNERS = {'stablehlo': _stablehlo_runner, 'onnx': _onnx_runner,
            'savedmodel': _savedmodel_runner}


def from_export(export_dir: str, fmt: str | None = None) -> Classifier:
  """The classifier of an export folder (stat_jax/deploy/export.py), run from
  format `fmt`, by default the first of EXPORT_FORMATS it holds."""
  manifest_path = storage.join(export_dir, 'manifest.json')
  if not tf.io.gfile.exists(manifest_path):
    raise FileNotFoundError(f'{manifest_path}: no such file; --export_dir must '
                            'be a folder written by stat_jax.deploy.export')
  try:
    manifest = json.loads(storage.read_text(manifest_path))
    held = [name for name in EXPORT_FORMATS if name in manifest['formats']]
  except (ValueError, KeyError, TypeError) as error:
    raise UserError(f'{manifest_path}: not a whole export manifest '
                     f'({type(error).__name__}: {error}); export again') from error
  if not held:
    raise UserError(f'{export_dir} holds none of the formats predict runs '
                     f'({", ".join(EXPORT_FORMATS)})')
  fmt = fmt or held[0]
  if fmt not in held:
    raise UserError(f'{export_dir} holds no {fmt} export; it holds '
                     f'{", ".join(held)}')
  path = storage.join(export_dir, manifest['formats'][fmt]['path'])
  config = ml_collections.ConfigDict(manifest['config'])
  try:
    runner = _RUNNERS[fmt](path)
  except Exception as error:  # each runtime raises its own types
    reason = (str(error).strip().splitlines() or [''])[0][:300]
    raise UserError(f'{path}: cannot load the {fmt} export (truncated or '
                     f'not written whole?): {type(error).__name__}: {reason}; '
                     'export again') from error
  return Classifier(config.data, manifest['classes'], runner)


def load_clip(path: str, data) -> np.ndarray:
  """float32 [B, T, H, W, 3] of the .npy file `path`, the shape of `data`'s
  clips; UserError naming what differs."""
  try:
    clip = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as error:
    raise UserError(f'{path}: not a .npy array file ({error})') from error
  want = defaults.clip_shape(data)
  if clip.dtype != np.float32 or clip.ndim != 5 or clip.shape[1:] != want:
    raise UserError(f'{path}: holds {clip.dtype} {list(clip.shape)}; the run '
                    f'takes preprocessed clips float32 [B, {", ".join(map(str, want))}]')
  return clip


def logits_fn(parts):
  """Jitted (params, preprocessed clip [B, T, H, W, 3]) -> the model's raw
  logits [B, classes], in eval mode."""

  def apply(params, clip):
    return nnx.merge(parts.eval_graph, params, parts.fresh_rngs())(clip)

  return jax.jit(apply)


def sampled_views(path: str, data) -> tuple[np.ndarray, np.ndarray]:
  """The eval views of a video file, uint8 [clips * crops, T, crop, crop,
  3], and the time (s) of each sampled frame, float [clips, T]: frame n at
  n / frame rate."""
  frames = convert.decode_video(path, data.eval_short_side)  # [N, H, W, 3]
  indices = sampling.eval_indices(len(frames), data)  # [clips, T]
  clips = tf.gather(frames, indices)  # [clips, T, H, W, 3]
  views = sampling.spatial_crops(clips, data.crop_size, data.num_crops)
  with convert.open_video(path) as container:
    rate = long_video.video_rate(container.streams.video[0])
  return views.numpy(), indices.numpy() / float(rate)


def video_views(path: str, data) -> np.ndarray:
  """The eval views of a video file: uint8 [clips * crops, T, crop, crop, 3]."""
  return sampled_views(path, data)[0]


def predict_video(classifier: Classifier, path: str, top_k: int) -> dict:
  """{'video', 'views', 'top': [{'label', 'index', 'probability'}]}, or
  {'video', 'error'} when the file cannot be read as a video."""
  try:
    views = video_views(path, classifier.data)
  except Exception as error:  # PyAV raises many types; all mean unreadable
    return {'video': path, 'error': f'cannot read video: '
                                    f'{type(error).__name__}: {error}'}
  probabilities = classifier.probabilities(views).mean(axis=0)  # [classes]
  best = np.argsort(-probabilities, kind='stable')[:top_k]
  return {'video': path, 'views': len(views),
          'top': [{'label': classifier.classes[i], 'index': int(i),
                   'probability': float(probabilities[i])} for i in best]}


def format_result(result: dict) -> str:
  lines = [f'{result["video"]} ({result["views"]} views)']
  lines += [f'  {rank}. {entry["probability"]:.4f}  {entry["label"]}'
            for rank, entry in enumerate(result['top'], 1)]
  return '\n'.join(lines)


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('workdir', None, 'Training run directory.',
                    flag_values=FLAGS)
flags.DEFINE_string('export_dir', None,
                    'Folder written by stat_jax.deploy.export.',
                    flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(['workdir', 'export_dir'], required=True,
                                     flag_values=FLAGS)
flags.DEFINE_string('checkpoint', 'latest',
                    "With --workdir: 'latest', 'best' or a step number.",
                    flag_values=FLAGS)
flags.DEFINE_enum('format', None, EXPORT_FORMATS,
                  'With --export_dir: the format to run.', flag_values=FLAGS)
flags.DEFINE_integer('top_k', 5, 'Classes listed per video.', lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'Print one JSON list of per-video results.',
                  flag_values=FLAGS)
flags.DEFINE_string('clip_npy', None, 'With --workdir and --json: print the '
                    'raw logits of the preprocessed clips in this .npy file '
                    '(float32 [B, T, H, W, 3], normalised), not of videos.',
                    flag_values=FLAGS)
# Long videos (stat_jax/deploy/long_video.py): a window sliding over time.
flags.DEFINE_float('window_s', None, 'Classify a window of this many seconds '
                   'sliding over the video, not the eval views of the whole.',
                   flag_values=FLAGS)
flags.DEFINE_float('stride_s', None, 'With --window_s: seconds between '
                   'window starts (default: --window_s).', flag_values=FLAGS)
flags.DEFINE_string('timeline', None, 'With --window_s: write the top-5 per '
                    'window to this JSON file and a plot beside it (.png).',
                    flag_values=FLAGS)
flags.DEFINE_string('overlay', None, 'With --window_s: write the video with '
                    'the top-3 of the current window drawn on it (.mp4).',
                    flag_values=FLAGS)

_PROGRAM = 'stat_jax.deploy.predict'


def _classifier() -> Classifier:
  if FLAGS.export_dir:
    return from_export(FLAGS.export_dir, FLAGS.format)
  return from_workdir(FLAGS.workdir, FLAGS.checkpoint)


def _predict(videos: list[str]) -> int:
  long_video.check_options(videos, FLAGS.window_s, FLAGS.stride_s,
                           FLAGS.timeline, FLAGS.overlay)
  classifier = _classifier()
  if FLAGS.window_s is not None:
    return long_video.run(
        classifier, videos, _PROGRAM, window_s=FLAGS.window_s,
        stride_s=FLAGS.stride_s, timeline_path=FLAGS.timeline,
        overlay_path=FLAGS.overlay, top_k=FLAGS.top_k, as_json=FLAGS.json)
  results = []
  for path in videos:
    result = predict_video(classifier, path, FLAGS.top_k)
    results.append(result)
    if 'error' in result:
      print(f'{_PROGRAM}: {path}: {result["error"]}', file=sys.stderr)
    elif not FLAGS.json:
      print(format_result(result), flush=True)
  if FLAGS.json:
    print(json.dumps(results, indent=1))
  return 1 if any('error' in r for r in results) else 0


def _predict_clip() -> int:
  if not FLAGS.workdir or not FLAGS.json:
    raise UserError('--clip_npy needs --workdir (an export takes uint8 video) '
                    'and --json (it prints {"logits": ...})')
  restored = inference.restore(FLAGS.workdir, FLAGS.checkpoint)
  clip = load_clip(FLAGS.clip_npy, restored.config.data)
  logits = logits_fn(restored.parts)(restored.params, clip)
  print(json.dumps({'logits': np.asarray(logits, np.float32).tolist()}))
  return 0


def run(videos: list[str]) -> int:
  """The tool, FLAGS parsed; `videos`: the arguments that are not flags."""
  if FLAGS.clip_npy:
    cli.no_positional(videos)
    return report_user_errors(_PROGRAM, _predict_clip)
  return cli.run_on_videos(_PROGRAM, _predict, videos)


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
