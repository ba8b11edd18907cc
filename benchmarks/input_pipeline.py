"""Train-pipeline throughput in clips/s per core, 224² crops from
256-short-side JPEG shards, and the bytes per clip a batch carries to the
device (results in benchmarks/RESULTS.md).

  python -m benchmarks.input_pipeline [--frames 16,32,64] [--clips 32]

Writes temporary shards of synthetic 256x256 video (or reads --spec), then
times the full train recipe (segment sampling, random resized crop, RandAugment
m7-n4-mstd0.5, random erasing 0.25, normalisation) after a warm-up batch.
"""

import os
import tempfile
import time

from absl import app, flags

from data import dmvr
from data import pipeline
from data import synthetic
from stat_jax import defaults

flags.DEFINE_string('spec', '', 'Existing shards to read.')
flags.DEFINE_list('frames', ['16', '32', '64'], 'Clip lengths T to time.')
flags.DEFINE_integer('crop', 224, 'Crop size.')
flags.DEFINE_integer('clips', 32, 'Synthetic clips to write.')
flags.DEFINE_integer('video_frames', 64, 'Frames of each synthetic video.')
flags.DEFINE_integer('batch_size', 8, 'Clips per batch.')
flags.DEFINE_integer('batches', 6, 'Batches timed.')
FLAGS = flags.FLAGS


def write_shards(folder, num_clips, num_frames, size):
  """Synthetic clips at `size`² (the converter's 256 short side)."""
  with dmvr.ShardedWriter(os.path.join(folder, 'bench.tfrecord'), 4) as writer:
    for i in range(num_clips):
      label = synthetic.clip_label(i)
      frames = synthetic.render_clip(label, 0, 'train', i, num_frames, size)
      writer.write(i % 4, dmvr.make_example(dmvr.encode_frames(frames),
                                            label).SerializeToString())
  return writer.spec


def clips_per_second(spec, num_frames, crop, batch_size, num_batches):
  config = defaults.base_config(num_frames, len(synthetic.CLASSES))
  config.data.train_spec = spec
  config.data.crop_size = crop
  config.data.flip = False
  config.batch_size = batch_size
  iterator = pipeline.make_train_iterator(config)
  first = next(iterator)  # tracing and pipeline start-up
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  rate = num_batches * batch_size / (time.perf_counter() - start)
  return rate, sum(value.nbytes for value in first.values()) / batch_size


def main(argv):
  del argv
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as folder:
    spec = FLAGS.spec or write_shards(folder, FLAGS.clips, FLAGS.video_frames,
                                      256)
    for frames in map(int, FLAGS.frames):
      rate, clip_bytes = clips_per_second(spec, frames, FLAGS.crop,
                                          FLAGS.batch_size, FLAGS.batches)
      print(f'T={frames:3d} {FLAGS.crop}x{FLAGS.crop}: {rate:7.1f} clips/s, '
            f'{rate / cores:6.1f} clips/s per core ({cores} cores), '
            f'{clip_bytes / 2**20:.2f} MiB per clip to the device', flush=True)


if __name__ == '__main__':
  app.run(main)
