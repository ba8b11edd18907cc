"""Augmentations: same parameters for every frame, exact replay from seeds."""

import numpy as np
import pytest
import tensorflow as tf

from data import augment


def _static_clip(frames=3, size=20, seed=0):
  """float32 [T, H, W, 3] in [0, 255] with identical random frames."""
  image = np.random.default_rng(seed).uniform(0, 255, (size, size, 3))
  return tf.constant(np.repeat(image[None], frames, 0), tf.float32)


def _frames_identical(clip):
  clip = np.asarray(clip)
  return np.allclose(clip, clip[:1], atol=1e-4)


@pytest.mark.parametrize('op', range(augment.NUM_OPS))
def test_each_randaugment_op_keeps_frames_identical(op):
  clip = _static_clip()
  out = augment.rand_augment_ops(clip, tf.constant(7.0),
                                 tf.constant(1.0))[op]().numpy()
  assert out.shape == clip.shape
  assert np.all(np.isfinite(out)) and out.min() >= 0 and out.max() <= 255
  assert _frames_identical(out)


def test_randaugment_ops_change_the_image():
  clip = _static_clip()
  ops = augment.rand_augment_ops(clip, tf.constant(7.0), tf.constant(1.0))
  changed = [not np.allclose(op().numpy(), clip.numpy()) for op in ops]
  assert all(changed)


def test_invert_and_identity_rotation():
  clip = _static_clip()
  ops = augment.rand_augment_ops(clip, tf.constant(0.0), tf.constant(1.0))
  np.testing.assert_allclose(ops[2](), 255 - clip.numpy())
  np.testing.assert_allclose(ops[3](), clip.numpy(), atol=1e-3)  # 0 degrees


def test_rand_augment_replays_and_is_clip_consistent():
  clip = _static_clip(frames=4)
  outs = [augment.rand_augment(clip, tf.constant([s, 1]), 4, 7.0, 0.5).numpy()
          for s in (3, 3, 4)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])
  assert all(_frames_identical(o) for o in outs)


def test_flip_flips_all_frames_or_none():
  clip = _static_clip()
  results = set()
  for seed in range(16):
    out = augment.random_flip(clip, tf.constant([seed, 0])).numpy()
    flipped = np.array_equal(out, clip.numpy()[:, :, ::-1])
    assert flipped or np.array_equal(out, clip.numpy())
    results.add(flipped)
  assert results == {True, False}


def test_random_erasing_box_same_in_every_frame():
  clip = tf.zeros([3, 20, 24, 3])
  never = augment.random_erasing(clip, tf.constant([0, 0]), 0.0).numpy()
  assert not never.any()
  erased = augment.random_erasing(clip, tf.constant([5, 0]), 1.0).numpy()
  box = erased[0].any(-1)  # [H, W]
  rows, cols = np.nonzero(box)
  assert 0.02 * 480 * 0.5 <= box.sum() <= 480 / 3 * 1.5
  assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a rectangle
  assert _frames_identical(erased)


def test_crop_window_inside_image():
  for seed in range(10):
    y, x, h, w = augment.random_crop_window(
        tf.constant([40, 60, 3]), tf.constant([seed, 0]), (0.08, 1.0),
        (3 / 4, 4 / 3)).numpy()
    assert 0 <= y and y + h <= 40 and 0 <= x and x + w <= 60
    assert 0.08 * 2400 * 0.8 <= h * w
