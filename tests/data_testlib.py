"""Helpers shared by the tests/test_data_*.py files: tiny shards and configs."""

import os

import numpy as np

from stat_jax import defaults
from stat_jax.data import dmvr

LEVEL_STEP = 8  # frame t of a `level_clip` has grey level LEVEL_STEP * t


def level_clip(num_frames, height=24, width=32):
  """uint8 [N, H, W, 3] whose frame t is uniformly LEVEL_STEP * t grey, so a
  decoded frame tells which frame it was."""
  levels = LEVEL_STEP * np.arange(num_frames, dtype=np.uint8)
  return np.broadcast_to(levels[:, None, None, None],
                         (num_frames, height, width, 3)).copy()


def frame_numbers(video):
  """Recovers level_clip frame numbers [.., T] from a uint8 video."""
  pixels = video.astype(np.float64).mean(axis=(-3, -2, -1))
  return np.round(pixels / LEVEL_STEP).astype(int)


def write_level_shards(folder, name, lengths, num_shards=3, bad=None):
  """One level_clip per entry of `lengths`, label = record number, clip i in
  shard i % num_shards. bad: {record number: 'proto' | 'jpeg'} corrupts that
  record. Returns the spec."""
  bad = bad or {}
  prefix = os.path.join(folder, f'{name}.tfrecord')
  with dmvr.ShardedWriter(prefix, num_shards) as writer:
    for i, length in enumerate(lengths):
      jpegs = dmvr.encode_frames(level_clip(length))
      if bad.get(i) == 'jpeg':  # every frame truncated: any sample fails
        jpegs = [jpeg[:len(jpeg) // 2] for jpeg in jpegs]
      record = dmvr.make_example(jpegs, i, f'class{i}', f'video{i}.mp4')
      record = record.SerializeToString()
      if bad.get(i) == 'proto':
        record = b'\x0a\xff\xff\xff garbage, not a proto'
      writer.write(i % num_shards, record)
  return writer.spec


def tiny_config(train_spec='', eval_spec='', frames=4, crop=16, batch=4):
  """Full config, augmentation off, small shapes; labels up to 31 (the
  record numbers of write_level_shards)."""
  config = defaults.base_config(frames, num_classes=32)
  data = config.data
  data.train_spec, data.eval_spec = train_spec, eval_spec
  data.crop_size = data.eval_short_side = crop
  data.area_range = (1.0, 1.0)
  data.aspect_range = (1.0, 1.0)
  data.flip = False
  data.randaugment_layers = 0
  data.random_erasing = 0.0
  data.num_clips, data.num_crops = 1, 1
  data.eval_batch_size = 2
  data.num_parallel_calls = 2
  config.batch_size = batch
  return config
