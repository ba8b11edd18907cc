"""16:9 shards for benchmarks/input_pipeline.py: textured synthetic videos
encoded with PyAV, then converted by stat_jax.data.convert (256 short side, as for
Kinetics). No camera video is available offline; the texture (smooth
noise at several scales, drifting) gives JPEGs of camera-like size.

  python -m benchmarks.wide_shards --out /tmp/wide [--videos 16]
  python -m benchmarks.input_pipeline --spec /tmp/wide/train.tfrecord@4
"""

import os

import av
import numpy as np
from absl import flags

from stat_jax.data import convert
from stat_jax import cli
from stat_jax.checks.errors import report_user_errors

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('out', None, 'Output folder.', required=True,
                    flag_values=FLAGS)
flags.DEFINE_integer('videos', 16, 'Videos to write.', flag_values=FLAGS)
flags.DEFINE_integer('frames', 250, 'Frames per video (10 s at 25 fps).',
                     flag_values=FLAGS)
flags.DEFINE_integer('shards', 4, 'Shards to write.', flag_values=FLAGS)

_SIZE = (360, 640)  # (H, W): 16:9, resized to 256 x 455 by stat_jax.data.convert
_RATE = 25


def texture(rng, height, width):
  """float32 [H, W, 3] in [0, 255]: noise smoothed at 4 scales, summed."""
  image = np.zeros((height, width, 3), np.float32)
  for cell in (64, 16, 4, 1):
    coarse = rng.uniform(-1, 1, (height // cell + 2, width // cell + 2, 3))
    image += np.kron(coarse, np.ones((cell, cell, 1)))[:height, :width] * cell
  image -= image.min()
  return (255 * image / image.max()).astype(np.float32)


def write_video(path, seed, num_frames):
  """A texture twice the frame size, panned diagonally, as an mpeg4 file."""
  height, width = _SIZE
  canvas = texture(np.random.default_rng(seed), 2 * height, 2 * width)
  with av.open(path, 'w') as container:
    stream = container.add_stream('mpeg4', rate=_RATE)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    stream.bit_rate = 4_000_000
    for t in range(num_frames):
      y, x = t % height, (2 * t) % width
      frame = canvas[y:y + height, x:x + width].astype(np.uint8)
      for packet in stream.encode(av.VideoFrame.from_ndarray(
          np.ascontiguousarray(frame), format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('benchmarks.wide_shards', _write)


def _write() -> int:
  folder = os.path.join(FLAGS.out, 'videos')
  os.makedirs(folder, exist_ok=True)
  videos = []
  for i in range(FLAGS.videos):
    path = os.path.join(folder, f'video{i}.mp4')
    write_video(path, i, FLAGS.frames)
    videos.append(convert.Video(path, i % 2, f'class{i % 2}'))
  summary = convert.convert(videos, ['class0', 'class1'], FLAGS.out,
                            num_shards=FLAGS.shards)
  print(summary['spec'])
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
