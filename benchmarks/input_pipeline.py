"""Train-pipeline throughput in clips/s per core, 224² crops from
256-short-side JPEG shards, the bytes per clip a batch carries to the
device, and what the device half of the recipe costs per clip on this
machine's CPU (results in benchmarks/RESULTS.md).

  python -m benchmarks.input_pipeline [--frames 16,32,64] [--clips 32]
      [--spec SPEC] [--repeated_augment 2] [--stages]

Writes temporary shards of synthetic 256x256 video (or reads --spec), then
times the host pipeline (segment sampling, random resized crop, uint8
batches) after a warm-up batch, then the device augmentation of the train
step (flip, RandAugment m7-n4-mstd0.5, normalisation, random erasing 0.25)
jitted on the XLA:CPU backend, on the last batch. --stages first times the
host's per-frame work alone, on one thread in a tf.data graph as the
pipeline runs it: decoding a whole JPEG frame, decoding a random crop window
of it, and that plus the resize to the crop; with the clips/s per core
each would allow at the first --frames, were it all the host did.
"""

import os
import tempfile
import time

import jax
import tensorflow as tf
from absl import flags

from stat_jax.data import dmvr
from stat_jax.data import records
from stat_jax.data import sampling
from stat_jax.data import train_pipeline
from stat_jax.data import synthetic
from stat_jax import augment_device, cli, defaults
from stat_jax.checks.errors import report_user_errors

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('spec', '', 'Existing shards to read.', flag_values=FLAGS)
flags.DEFINE_list('frames', ['16', '32', '64'], 'Clip lengths T to time.',
                  flag_values=FLAGS)
flags.DEFINE_integer('crop', 224, 'Crop size.', flag_values=FLAGS)
flags.DEFINE_integer('clips', 32, 'Synthetic clips to write.',
                     flag_values=FLAGS)
flags.DEFINE_integer('video_frames', 64, 'Frames of each synthetic video.',
                     flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 8, 'Clips per batch.', flag_values=FLAGS)
flags.DEFINE_integer('batches', 6, 'Batches timed.', flag_values=FLAGS)
flags.DEFINE_integer('repeated_augment', 1,
                     'data.repeated_augment: clips per decoded video.',
                     flag_values=FLAGS)
flags.DEFINE_integer('device_clips', 2, 'Clips the device augmentation times.',
                     flag_values=FLAGS)
flags.DEFINE_bool('stages', False, 'Time the per-frame host stages first.',
                  flag_values=FLAGS)
flags.DEFINE_integer('stage_frames', 400, 'Frames each stage is timed on.',
                     flag_values=FLAGS)


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
  """(host clips/s, bytes per clip of a batch, device augmentation seconds
  per clip)."""
  config = defaults.base_config(num_frames, len(synthetic.CLASSES))
  config.data.repeated_augment = FLAGS.repeated_augment
  config.data.train_spec = spec
  config.data.crop_size = crop
  config.batch_size = batch_size
  iterator = train_pipeline.make_train_iterator(config)
  batch = next(iterator)  # tracing and pipeline start-up
  clip_bytes = sum(value.nbytes for value in batch.values()) / batch_size
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
  rate = num_batches * batch_size / (time.perf_counter() - start)
  clips = {key: value[:FLAGS.device_clips] for key, value in batch.items()}
  return rate, clip_bytes, device_seconds_per_clip(config, clips)


def frame_jpegs(spec, count):
  """The first `count` JPEG frames of the shards (string [count])."""
  index, jpegs = records.RecordIndex(spec), []
  for record in range(len(index)):
    jpegs.extend(dmvr.parse_tf(tf.constant(index.read(record)))['frames'])
    if len(jpegs) >= count:
      break
  return tf.stack(jpegs[:count])


def stage_seconds_per_frame(jpegs, data):
  """{stage: seconds per frame}, one thread, graph mode, after a warm-up
  pass; the crop windows as the train pipeline draws them."""
  def crop(jpeg, seed):
    return sampling.random_crop_window(tf.io.extract_jpeg_shape(jpeg), seed,
                                       data.area_range, data.aspect_range)

  def window(jpeg, seed):
    return tf.io.decode_and_crop_jpeg(jpeg, crop(jpeg, seed), channels=3)

  stages = {
      'decode the whole frame': lambda jpeg, seed: tf.io.decode_jpeg(
          jpeg, channels=3),
      'decode the crop window': window,
      'decode the window + resize': lambda jpeg, seed: tf.image.resize(
          window(jpeg, seed), [data.crop_size, data.crop_size]),
  }
  seeds = tf.random.experimental.stateless_split([0, 0], len(jpegs))
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.autotune.enabled = False
  seconds = {}
  for name, stage in stages.items():
    frames = tf.data.Dataset.from_tensor_slices((jpegs, seeds)).map(
        stage).with_options(options)
    for _ in frames:  # warm-up: tracing, caches
      pass
    start = time.perf_counter()
    for _ in frames:
      pass
    seconds[name] = (time.perf_counter() - start) / len(jpegs)
  return seconds


def device_seconds_per_clip(config, batch):
  """The device augmentation of `batch`, jitted on this backend, best of 3."""
  augment = jax.jit(lambda video, key: augment_device.augment_batch(
      video, key, config.data))
  jax.block_until_ready(augment(batch['video'], batch['key']))  # compile
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(augment(batch['video'], batch['key']))
    times.append(time.perf_counter() - start)
  return min(times) / len(batch['video'])


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('benchmarks.input_pipeline', _time_pipeline)


def _time_pipeline() -> int:
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as folder:
    spec = FLAGS.spec or write_shards(folder, FLAGS.clips, FLAGS.video_frames,
                                      256)
    if FLAGS.stages:
      frames = int(FLAGS.frames[0])
      data = defaults.base_config(frames, len(synthetic.CLASSES)).data
      data.crop_size = FLAGS.crop
      for name, seconds in stage_seconds_per_frame(
          frame_jpegs(spec, FLAGS.stage_frames), data).items():
        print(f'{name:28s} {1e3 * seconds:6.2f} ms per frame, one thread: '
              f'at most {1 / (frames * seconds):6.1f} clips/s per core at '
              f'T={frames}', flush=True)
    for frames in map(int, FLAGS.frames):
      rate, clip_bytes, device_s = clips_per_second(
          spec, frames, FLAGS.crop, FLAGS.batch_size, FLAGS.batches)
      print(f'T={frames:3d} {FLAGS.crop}x{FLAGS.crop}: {rate:7.1f} clips/s, '
            f'{rate / cores:6.1f} clips/s per core ({cores} cores), '
            f'{clip_bytes / 2**20:.2f} MiB per clip to the device; device '
            f'augmentation on {jax.default_backend()}: '
            f'{1e3 * device_s:.0f} ms per clip', flush=True)
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
