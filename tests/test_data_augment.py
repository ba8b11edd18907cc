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


@pytest.mark.parametrize('pixels,axis', [(3.0, 2), (-5.0, 2), (4.0, 1),
                                         (-2.0, 1), (2.6, 2)])
def test_translate_equals_the_warp_at_whole_pixels(pixels, axis):
  clip = _static_clip(frames=2, size=12)
  offset = [1., 0., 0., 0., 1., 0.]  # identity + the whole-pixel shift
  offset[2 if axis == 2 else 5] = float(np.round(pixels))
  warped = augment._affine(clip, tf.constant(offset))
  np.testing.assert_allclose(augment._translate(clip, pixels, axis), warped,
                             atol=1e-3)
  shifted = np.asarray(augment._translate(clip, pixels, axis))
  assert (shifted == augment._FILL).any()  # the uncovered edge is grey


def test_autocontrast_matches_pil_and_stretches_each_channel():
  pil_ops = pytest.importorskip('PIL.ImageOps')
  pil_image = pytest.importorskip('PIL.Image')
  rng = np.random.default_rng(3)
  image = rng.integers([20, 0, 90], [200, 256, 150], (16, 16, 3)).astype(np.uint8)
  out = augment._autocontrast(tf.constant(image[None], tf.float32)).numpy()[0]
  reference = np.asarray(pil_ops.autocontrast(pil_image.fromarray(image)))
  np.testing.assert_allclose(out, reference, atol=1.0)  # PIL truncates
  np.testing.assert_allclose(out.min((0, 1)), 0, atol=1e-3)
  np.testing.assert_allclose(out.max((0, 1)), 255, atol=1e-3)


def test_channel_extremes_over_the_whole_clip():
  clip = np.random.default_rng(1).uniform(0, 255, (3, 5, 7, 3)).astype(np.float32)
  np.testing.assert_array_equal(
      augment._channel_extreme(tf.reduce_min, tf.constant(clip)),
      clip.min((0, 1, 2)))
  np.testing.assert_array_equal(
      augment._channel_extreme(tf.reduce_max, tf.constant(clip)),
      clip.max((0, 1, 2)))
