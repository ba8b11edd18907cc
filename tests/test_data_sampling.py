"""Temporal sampling and spatial crops against hand-worked index cases."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from stat_jax.data import sampling


def _segment(num_frames, segments, fraction):
  fractions = tf.fill([segments], float(fraction))
  return sampling.segment_indices(num_frames, segments, fractions).numpy()


@pytest.mark.parametrize('num_frames, fraction, expected', [
    (8, 0.5, [1, 3, 5, 7]),   # segments [0,2) [2,4) [4,6) [6,8): centres
    (10, 0.5, [1, 3, 6, 8]),  # [0,2) [2,5) [5,7) [7,10)
    (10, 0.0, [0, 2, 5, 7]),  # segment starts
    (10, 0.999, [1, 4, 6, 9]),  # segment ends
    (2, 0.5, [0, 0, 1, 1]),   # fewer frames than segments: repeat
    (1, 0.7, [0, 0, 0, 0]),
])
def test_segment_indices(num_frames, fraction, expected):
  assert _segment(num_frames, 4, fraction).tolist() == expected


def test_segment_indices_random_stay_in_segments():
  fractions = tf.random.stateless_uniform([5], [1, 2])
  indices = sampling.segment_indices(23, 5, fractions).numpy()
  bounds = [i * 23 // 5 for i in range(6)]
  for i, index in enumerate(indices):
    assert bounds[i] <= index < bounds[i + 1]


def test_dense_indices_and_looping():
  assert sampling.dense_indices(20, 4, 3, 2).numpy().tolist() == [2, 5, 8, 11]
  assert sampling.dense_indices(5, 4, 2, 0).numpy().tolist() == [0, 2, 4, 1]
  assert int(sampling.dense_slack(20, 4, 3)) == 10  # span 10
  assert int(sampling.dense_slack(5, 4, 2)) == 0


def _data(sampling_kind, clips, frames=4, stride=3):
  return ml_collections.ConfigDict({
      'sampling': sampling_kind, 'num_frames': frames, 'frame_stride': stride,
      'num_clips': clips})


def test_eval_indices_dense_uniform_clips():
  indices = sampling.eval_indices(20, _data('dense', 3)).numpy()
  assert indices.tolist() == [[0, 3, 6, 9], [5, 8, 11, 14], [10, 13, 16, 19]]
  one = sampling.eval_indices(20, _data('dense', 1)).numpy()
  assert one.tolist() == [[5, 8, 11, 14]]  # centred: slack 10 // 2


def test_eval_indices_segment_clips():
  indices = sampling.eval_indices(8, _data('segment', 2)).numpy()
  assert indices.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_train_dense_start_in_range():
  data = _data('dense', 1, frames=4, stride=2)
  for seed in range(20):
    indices = sampling.train_indices(30, data, [seed, 0]).numpy()
    assert 0 <= indices[0] <= 30 - 7
    assert np.all(np.diff(indices) == 2)


def test_unknown_sampling_is_named():
  with pytest.raises(ValueError, match="'segment' or 'dense', got 'tsn'"):
    sampling.train_indices(10, _data('tsn', 1), [0, 0])


def _column_clip(height, width):
  """clips [1, 2, H, W, 3] whose value at (y, x) is 100 * y + x."""
  grid = 100 * np.arange(height)[:, None] + np.arange(width)[None, :]
  return np.broadcast_to(grid[None, None, :, :, None].astype(np.float32),
                         (1, 2, height, width, 3))


@pytest.mark.parametrize('height, width, corners', [
    (4, 10, [0, 3, 6]),          # wide: crops slide along x
    (10, 4, [0, 300, 600]),      # tall: crops slide along y
])
def test_three_spatial_crops(height, width, corners):
  views = sampling.spatial_crops(_column_clip(height, width), 4, 3).numpy()
  assert views.shape == (3, 2, 4, 4, 3)
  assert views[:, 0, 0, 0, 0].tolist() == corners
  assert np.all(views[:, 0] == views[:, 1])  # both frames cropped alike


def test_centre_crop_and_view_order():
  clips = np.concatenate([_column_clip(6, 8), _column_clip(6, 8) + 1000], 0)
  views = sampling.spatial_crops(clips, 4, 1).numpy()
  assert views[:, 0, 0, 0, 0].tolist() == [102, 1102]  # y 1, x 2; clip order


def test_resize_short_side():
  frames = tf.zeros([2, 30, 50, 3], tf.uint8)
  assert sampling.resize_short_side(frames, 12).shape == (2, 12, 20, 3)


def test_crop_window_inside_image():
  for seed in range(10):
    y, x, h, w = sampling.random_crop_window(
        tf.constant([40, 60, 3]), tf.constant([seed, 0]), (0.08, 1.0),
        (3 / 4, 4 / 3)).numpy()
    assert 0 <= y and y + h <= 40 and 0 <= x and x + w <= 60
    assert 0.08 * 2400 * 0.8 <= h * w


def test_random_resized_crops_cut_each_window_from_the_frames():
  data = ml_collections.ConfigDict({
      'num_frames': 2, 'crop_size': 8, 'area_range': (0.1, 0.5),
      'aspect_range': (0.5, 2.0)})
  # Frame t: pixel (y, x) = 2 y + 50 t, smooth enough for JPEG to keep.
  rows = 2 * np.arange(48)[:, None, None]
  frames = [np.broadcast_to(rows + 50 * t, (48, 64, 3)).astype(np.uint8)
            for t in range(2)]
  jpegs = tf.stack([tf.io.encode_jpeg(f, quality=100) for f in frames])
  seed = tf.constant([3, 4], tf.int64)
  crops = sampling.random_resized_crops(jpegs, data, seed, 3).numpy()
  assert crops.shape == (3, 2, 8, 8, 3) and crops.dtype == np.uint8
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  for crop, window_seed in zip(crops, seeds):
    y, _, h, _ = sampling.random_crop_window(
        tf.constant([48, 64, 3]), window_seed, data.area_range,
        data.aspect_range).numpy()
    # Rows y .. y + h - 1 resized to 8: the first and last rows' levels.
    for t in range(2):
      assert abs(int(crop[t, 0, 0, 0]) - (2 * y + 50 * t)) <= 2 * h / 8 + 2
      assert abs(int(crop[t, -1, 0, 0]) - (2 * (y + h - 1) + 50 * t)) <= (
          2 * h / 8 + 2)
  assert len({crop.tobytes() for crop in crops}) == 3  # three windows
