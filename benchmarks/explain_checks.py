"""Checks behind what explain shows (results in benchmarks/RESULTS.md,
"What STAT sees"): what re-encoding eval clips as video files does to a
checkpoint's predictions, whether STA's attention shares follow the motion,
and which attention set carries the temporal order.

  python -m benchmarks.explain_checks --workdir=runs/demo --checkpoint=best \
      [--spec=cache/synthetic_motion/val.tfrecord@2] [--per_class=40]

Takes up to --per_class eval records of each class from --spec (default:
the run's eval_spec), cuts each into views as evaluation does
(stat_jax/data/eval_pipeline.py eval_views), writes view 0 as a video file with each
codec of CODECS at 8 frames per second, reads it back as predict and explain
read videos (stat_jax/deploy/predict.py video_views), and prints per codec
the mean |pixel change|, top-1 and top-1 per class. Then, for the first
record of each class, the top-1 and the CA/SA/LA share of every STA block
on the clip, on the clip frozen (frame 0 repeated) and played backwards.
Last, top-1 and the time-reversal score (backwards clips given the reversed
class, config data.reversed_classes) of the model as trained and with SA or
LA taken out of every STA block (model.attention; neither has parameters
of its own, so the same checkpoint runs).
"""

import collections
import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

import av  # pylint: disable=g-import-not-at-top
import jax
import numpy as np
import tensorflow as tf
from absl import flags

from stat_jax.data import dmvr, eval_pipeline
from stat_jax import attention_maps, cli
from stat_jax.checks.errors import report_user_errors
from stat_jax.deploy import inference, predict
from stat_jax.train_state import ModelParts

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('workdir', None, 'Training run directory.', required=True,
                    flag_values=FLAGS)
flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step.",
                    flag_values=FLAGS)
flags.DEFINE_string('spec', '', 'Eval shards (default: the run\'s eval_spec).',
                    flag_values=FLAGS)
flags.DEFINE_integer('per_class', 40, 'Records of each class.',
                     flag_values=FLAGS)

RATE = 8  # frames per second of the written files
# name: (codec, pixel format, options, bit rate or None for the default)
CODECS = {
    'mpeg4, PyAV default rate': ('mpeg4', 'yuv420p', {}, None),
    'mpeg4, 1 Mbit/s': ('mpeg4', 'yuv420p', {}, 1_000_000),
    'libx264 crf 23, yuv420p': ('libx264', 'yuv420p', {}, None),
    'libx264rgb crf 0 (lossless)': ('libx264rgb', 'rgb24', {'crf': '0'}, None),
}


def write_video(path, frames, codec, pix_fmt, options, bit_rate):
  """frames uint8 [T, H, W, 3] -> a video file at RATE frames per second."""
  _, height, width, _ = frames.shape
  with av.open(path, 'w') as container:
    stream = container.add_stream(codec, rate=RATE, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    if bit_rate:
      stream.bit_rate = bit_rate
    for frame in frames:
      image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                         format='rgb24')
      container.mux(stream.encode(image))
    container.mux(stream.encode())


def eval_clips(spec, data, per_class):
  """[(label, uint8 views [V, T, crop, crop, 3])], up to per_class a class."""
  taken, clips = collections.Counter(), []
  for path in dmvr.resolve_spec(spec):
    for serialized in dmvr.read_records(path):
      label = dmvr.parse_example(serialized).label_indices[0]
      if taken[label] < per_class:
        taken[label] += 1
        parsed = dmvr.parse_tf(tf.constant(serialized))
        clips.append((label, eval_pipeline.eval_views(parsed, data).numpy()))
  return sorted(clips, key=lambda clip: clip[0])


def codec_table(restored, clips, folder):
  """Per way of reading (the eval views, then each codec): mean |pixel
  change|, top-1, top-1 per class."""
  data, classes = restored.config.data, restored.classes
  labels = np.array([label for label, _ in clips])
  print(f'{"":30s} |change|  top-1  top-1 per class: {" ".join(classes)}')
  for name, spec in [('eval views (no video file)', None), *CODECS.items()]:
    changes, predicted = [], []
    for label, views in clips:
      if spec is not None:
        path = os.path.join(folder, 'clip.mp4')
        write_video(path, views[0], *spec)
        read = predict.video_views(path, data)
      else:
        read = views
      changes.append(np.abs(read.astype(np.float32) - views).mean())
      probabilities = np.asarray(restored.classify(read)[1]).mean(axis=0)
      predicted.append(int(probabilities.argmax()))
    right = np.array(predicted) == labels
    per_class = ' '.join(f'{right[labels == c].mean():.2f}'
                         for c in range(len(classes)) if (labels == c).any())
    print(f'{name:30s} {np.mean(changes):7.2f}  {right.mean():.3f}  '
          f'{per_class}')


def shares_table(restored, clips):
  """Top-1 and CA/SA/LA shares per STA block on the first clip of each class,
  frozen and played backwards."""
  capture = jax.jit(attention_maps.capture_fn(restored.parts,
                                              restored.config.data))
  print('\nCA/SA/LA shares per STA block (view 0)')
  seen = set()
  for label, views in clips:
    if label in seen:
      continue
    seen.add(label)
    frozen = np.repeat(views[:, :1], views.shape[1], axis=1)
    for name, clip in (('clip', views), ('frozen', frozen),
                       ('backwards', views[:, ::-1])):
      logits, summary = capture(restored.params, clip)
      probabilities = np.asarray(jax.nn.softmax(logits, axis=-1)).mean(axis=0)
      best = int(probabilities.argmax())
      shares = np.asarray(summary['shares'])[:, 0]  # [L, 3]
      print(f'{restored.classes[label] if name == "clip" else "":24s}'
            f'{name:10s} {restored.classes[best]} {probabilities[best]:.2f}  '
            + '  '.join('/'.join(f'{v:.2f}' for v in row) for row in shares))


def ablation_table(restored, clips):
  """Top-1 and time-reversal score with every STA block's SA or LA out."""
  reversed_of = restored.config.data.reversed_classes
  labels = np.array([label for label, _ in clips])
  print('\nattention sets: top-1, time-reversal score (backwards clips given '
        'the reversed class)')
  for attention in ('ca+sa+la', 'ca+la', 'ca+sa', 'ca'):
    config = restored.config.copy_and_resolve_references()
    config.model.attention = attention
    apply = jax.jit(inference.serving_fn(ModelParts(config), config.data))
    predicted = {}
    for name, flip in (('clip', False), ('backwards', True)):
      predicted[name] = np.array([
          int(np.asarray(apply(restored.params, views[:, ::-1] if flip
                               else views)[1]).mean(axis=0).argmax())
          for _, views in clips])
    reversal = np.mean(predicted['backwards'] ==
                       np.array([reversed_of[label] for label in labels]))
    print(f'{attention:10s} top-1 {np.mean(predicted["clip"] == labels):.3f}'
          f'  time-reversal {reversal:.3f}')


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('benchmarks.explain_checks', _checks)


def _checks() -> int:
  restored = inference.restore(FLAGS.workdir, FLAGS.checkpoint)
  data = restored.config.data
  clips = eval_clips(FLAGS.spec or data.eval_spec, data, FLAGS.per_class)
  print(f'{len(clips)} eval records, view 0 written at {RATE} fps, '
        f'{data.num_frames} frames of {data.crop_size}x{data.crop_size}')
  with tempfile.TemporaryDirectory() as folder:
    codec_table(restored, clips, folder)
  shares_table(restored, clips)
  ablation_table(restored, clips)
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
