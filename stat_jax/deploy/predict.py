"""Classify video files with a trained run or with an export of one.

  python -m stat_jax.predict --workdir=runs/k400_16 [--checkpoint=best] \
      a.mp4 b.webm
  python -m stat_jax.predict --export_dir=exports/k400_16 [--format=onnx] \
      a.avi --json

Each video is decoded with PyAV (any container and codec FFmpeg reads),
its short side resized to data.eval_short_side, and cut into the eval views
of the run's config with data/sampling.py (num_clips x num_crops clips of T
frames); the class probabilities are averaged over the views, as eval.py
does. Prints the top-k classes of each video, or with --json one JSON list.
A file that cannot be read is reported and skipped; the exit code is then 1.
"""

import argparse
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

from data import convert, sampling
from stat_jax import inference

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
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return lambda views: np.asarray(exported.call(views)[1])


def _onnx_runner(path):
  session = onnxruntime.InferenceSession(path,
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
  """The classifier of an export folder (stat_jax/export.py), run from
  format `fmt`, by default the first of EXPORT_FORMATS it holds."""
  manifest_path = os.path.join(export_dir, 'manifest.json')
  if not os.path.exists(manifest_path):
    raise FileNotFoundError(f'{manifest_path}: no such file; --export_dir must '
                            'be a folder written by stat_jax.export')
  with open(manifest_path) as f:
    manifest = json.load(f)
  held = [name for name in EXPORT_FORMATS if name in manifest['formats']]
  if not held:
    raise ValueError(f'{export_dir} holds none of the formats predict runs '
                     f'({", ".join(EXPORT_FORMATS)})')
  fmt = fmt or held[0]
  if fmt not in held:
    raise ValueError(f'{export_dir} holds no {fmt} export; it holds '
                     f'{", ".join(held)}')
  path = os.path.join(export_dir, manifest['formats'][fmt]['path'])
  config = ml_collections.ConfigDict(manifest['config'])
  return Classifier(config.data, manifest['classes'], _RUNNERS[fmt](path))


def video_views(path: str, data) -> np.ndarray:
  """The eval views of a video file: uint8 [clips * crops, T, crop, crop, 3]."""
  frames = convert.decode_video(path, data.eval_short_side)  # [N, H, W, 3]
  indices = sampling.eval_indices(len(frames), data)  # [clips, T]
  clips = tf.gather(frames, indices)  # [clips, T, H, W, 3]
  return sampling.spatial_crops(clips, data.crop_size, data.num_crops).numpy()


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('videos', nargs='+', help='video files')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='training run directory')
  source.add_argument('--export_dir', help='folder written by stat_jax.export')
  parser.add_argument('--checkpoint', default='latest',
                      help="with --workdir: 'latest', 'best' or a step number")
  parser.add_argument('--format', choices=EXPORT_FORMATS,
                      help='with --export_dir: the format to run')
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--json', action='store_true',
                      help='print one JSON list of per-video results')
  args = parser.parse_args(argv)
  try:
    classifier = (from_export(args.export_dir, args.format) if args.export_dir
                  else from_workdir(args.workdir, args.checkpoint))
  except (ValueError, FileNotFoundError) as error:
    print(f'stat_jax.predict: {error}', file=sys.stderr)
    return 1
  results = []
  for path in args.videos:
    result = predict_video(classifier, path, args.top_k)
    results.append(result)
    if 'error' in result:
      print(f'stat_jax.predict: {path}: {result["error"]}', file=sys.stderr)
    elif not args.json:
      print(format_result(result), flush=True)
  if args.json:
    print(json.dumps(results, indent=1))
  return 1 if any('error' in r for r in results) else 0


if __name__ == '__main__':
  sys.exit(main())
