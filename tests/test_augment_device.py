"""The device augmentation (stat_jax/augment_device.py): each RandAugment op
and whole plans against the tf.image version that ran on the host
(tf_augment_reference) or PIL, flip and erasing, uint8 in and normalised
float out, and the same clips on 1 and on 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import tf_augment_reference as reference
from conftest import run_on_cpu_devices
from stat_jax import augment_device, defaults
# float32 [0, 255] results of two implementations differ by rounding only;
# the bilinear warps interpolate with other operation orders.
TOLERANCE = 2e-3
# Contrast (op 8) takes the clip mean of grey levels rounded to halves (the
# same bits on any mesh): within 1e-2 of tf's on these 1440 pixels.
CONTRAST, CONTRAST_TOLERANCE = 8, 1e-2


def _clip(frames=3, height=20, width=24, seed=0, static=False):
  """float32 [T, H, W, 3] of whole levels in [20, 200) (room for
  AutoContrast and Equalize to act); `static`: one random frame T times."""
  rng = np.random.default_rng(seed)
  if static:
    frame = rng.integers(20, 200, (height, width, 3))
    return np.repeat(frame[None], frames, 0).astype(np.float32)
  return rng.integers(20, 200, (frames, height, width, 3)).astype(np.float32)


def _key_data(count, seed=0):
  """uint32 [count, 2] key data, as the host ships it."""
  return np.random.default_rng(seed).integers(0, 2**32, (count, 2), np.uint32)


@pytest.mark.parametrize('op', range(augment_device.NUM_OPS))
def test_each_op_matches_the_tf_image_version(op):
  clip = _clip()
  level, sign = 7.3, (-1.0) ** op  # both signs among the signed ops
  expected = reference.rand_augment_ops(
      tf.constant(clip), tf.constant(level), tf.constant(sign))[op]().numpy()
  out = np.asarray(augment_device.apply_op(
      jnp.asarray(clip), jnp.int32(op), jnp.float32(level), jnp.float32(sign)))
  np.testing.assert_allclose(
      out, expected, atol=CONTRAST_TOLERANCE if op == CONTRAST else TOLERANCE)
  assert not np.allclose(out, clip)  # the op did something


def test_warps_read_grey_outside_the_frame():
  clip = jnp.zeros((1, 8, 10, 3))
  shifted = np.asarray(augment_device.affine(
      clip, augment_device.translation(3.4, axis=2)))
  assert (shifted[:, :, -3:] == augment_device.FILL).all()
  assert (shifted[:, :, :-3] == 0).all()
  turned = np.asarray(augment_device.affine(
      clip, augment_device.rotation(jnp.float32(45.), 8, 10)))
  assert turned[0, 0, 0, 0] == augment_device.FILL
  assert turned[0, 4, 5, 0] == 0  # the centre stays inside


def affine_per_value(clip, transform):
  """`affine` as it gathered before: every frame and channel of a pixel
  read through its own index (the clip kept [T, H, W, C])."""
  height, width = clip.shape[1:3]
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                      jnp.arange(width, dtype=jnp.float32), indexing='ij')
  source_x = transform[0] * x + transform[1] * y + transform[2]
  source_y = transform[3] * x + transform[4] * y + transform[5]
  x0, y0 = jnp.floor(source_x), jnp.floor(source_y)

  def read(row, column):
    inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
    pixels = clip[:, jnp.clip(row, 0, height - 1).astype(jnp.int32),
                  jnp.clip(column, 0, width - 1).astype(jnp.int32)]
    return jnp.where(inside[:, :, None], pixels, augment_device.FILL)

  wx, wy = (source_x - x0)[:, :, None], (source_y - y0)[:, :, None]
  top = (1 - wx) * read(y0, x0) + wx * read(y0, x0 + 1)
  bottom = (1 - wx) * read(y0 + 1, x0) + wx * read(y0 + 1, x0 + 1)
  return (1 - wy) * top + wy * bottom


def test_warp_reading_whole_pixels_is_bit_equal_to_reading_each_value():
  """affine gathers each pixel's T x C values at once ([H, W, T C], for
  XLA:TPU one index per pixel): the same bits as one index per value, also
  vmapped over clips under jit as the train step runs it."""
  clip = jnp.asarray(_clip(frames=4) + 0.25)
  transforms = [augment_device.rotation(jnp.float32(17.), 20, 24),
                augment_device.shear(0.2, axis=2),
                augment_device.shear(-0.25, axis=1),
                augment_device.translation(5.4, axis=2),
                jnp.array([0.9, 0.1, 1.3, -0.2, 1.1, -2.])]
  batched = jax.jit(jax.vmap(augment_device.affine))
  batched_reference = jax.jit(jax.vmap(affine_per_value))
  for transform in transforms:
    np.testing.assert_array_equal(augment_device.affine(clip, transform),
                                  affine_per_value(clip, transform))
    np.testing.assert_array_equal(batched(clip[None], transform[None]),
                                  batched_reference(clip[None], transform[None]))


def test_autocontrast_and_equalize_match_pil():
  pil_ops = pytest.importorskip('PIL.ImageOps')
  pil_image = pytest.importorskip('PIL.Image')
  rng = np.random.default_rng(3)
  image = rng.integers([20, 0, 90], [200, 256, 150], (16, 16, 3), np.uint8)
  frame = jnp.asarray(image[None], jnp.float32)  # a one-frame clip
  for ours, theirs in ((augment_device.autocontrast, pil_ops.autocontrast),
                       (augment_device.equalize, pil_ops.equalize)):
    expected = np.asarray(theirs(pil_image.fromarray(image)), np.float32)
    # PIL truncates to whole levels.
    np.testing.assert_allclose(ours(frame)[0], expected, atol=1.0)


def test_a_plan_draws_the_m7_n4_mstd05_recipe():
  keys = jax.vmap(augment_device.clip_key)(_key_data(4000))
  plans = jax.vmap(lambda key: augment_device.draw_layers(key, 4, 7.0, 0.5))(
      keys)
  assert plans['op'].shape == (4000, 4)
  counts = np.bincount(np.asarray(plans['op']).ravel(), minlength=15)
  assert len(counts) == 15 and counts.min() > 0.8 * 16000 / 15
  assert abs(float(plans['apply'].mean()) - 0.5) < 0.02
  assert abs(float(plans['sign'].mean())) < 0.03
  level = np.asarray(plans['level'])
  assert abs(level.mean() - 7.0) < 0.02 and abs(level.std() - 0.5) < 0.02


def test_rand_augment_applies_its_plan_like_the_tf_image_version():
  clip = _clip(frames=2, height=16, width=20, seed=5)
  for seed in range(3):
    key = augment_device.clip_key(_key_data(1, seed)[0])
    plan = jax.tree.map(np.asarray,
                        augment_device.draw_layers(key, 4, 7.0, 0.5))
    assert plan['apply'].any()
    out = jax.jit(augment_device.rand_augment, static_argnums=(2, 3, 4))(
        jnp.asarray(clip), key, 4, 7.0, 0.5)
    expected = reference.rand_augment(tf.constant(clip), plan).numpy()
    # A warp's rounding can move a later op's threshold (posterize,
    # solarize, equalize) by one step on a few pixels.
    close = np.isclose(out, expected, atol=CONTRAST_TOLERANCE)
    assert close.mean() > 0.99, (plan, close.mean())


def _recipe(**overrides):
  """The data config's augmentation keys: the K400 recipe, `overrides`."""
  data = defaults.data_config(num_frames=2)
  for key, value in overrides.items():
    data[key] = value
  return data


def test_uint8_in_normalised_float_out():
  data = _recipe(flip=False, randaugment_layers=0, random_erasing=0.0,
                 mean=(0.4, 0.45, 0.5), std=(0.2, 0.25, 0.3))
  video = _clip(frames=2).astype(np.uint8)[None]  # [1, T, H, W, 3]
  out = augment_device.augment_batch(jnp.asarray(video), _key_data(1), data)
  assert out.dtype == jnp.float32
  expected = (video / 255. - np.array(data.mean)) / np.array(data.std)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_flip_flips_all_frames_or_none():
  clip = jnp.asarray(_clip())
  flipped = [bool(np.array_equal(augment_device.random_flip(
      clip, augment_device.clip_key(key)), clip[:, :, ::-1]))
             for key in _key_data(16)]
  assert set(flipped) == {True, False}


def test_random_erasing_box_is_the_same_in_every_frame():
  clip = jnp.zeros((3, 20, 24, 3))
  key = augment_device.clip_key(_key_data(1)[0])
  assert not augment_device.random_erasing(clip, key, 0.0).any()
  erased = np.asarray(augment_device.random_erasing(clip, key, 1.0))
  box = erased[0].any(-1)  # [H, W]
  rows, columns = np.nonzero(box)
  assert 0.02 * 480 * 0.5 <= box.sum() <= 480 / 3 * 1.5
  assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(columns) + 1)  # a rectangle
  np.testing.assert_array_equal(erased, erased[:1].repeat(3, 0))


def test_clip_by_clip_matches_the_vmapped_recipe():
  """augment_batch maps the clips one after another (each switch runs the
  op drawn); vmapped, the former form, every op ran and one was selected.
  Same numbers, to float32 rounding (the two programs fuse differently)."""
  data = defaults.data_config(num_frames=4)  # flip, RandAugment m7-n4-mstd0.5
  data.random_erasing = 0.5
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (16, 4, 24, 24, 3), np.uint8)
  keys = _key_data(16)
  mapped = jax.jit(lambda v, k: augment_device.augment_batch(v, k, data))
  vmapped = jax.jit(jax.vmap(lambda v, k: augment_device.augment_clip(v, k,
                                                                      data)))
  np.testing.assert_allclose(mapped(video, keys), vmapped(video, keys),
                             rtol=0, atol=1e-5)


MESH_SCRIPT = r'''
import json
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from stat_jax import augment_device, defaults, sharding
from stat_jax.train_step import per_device

data = defaults.data_config(num_frames=2)  # flip, RandAugment m7-n4-mstd0.5
data.random_erasing = 0.5
rng = np.random.default_rng(0)
video = rng.integers(0, 256, (8, 1, 16, 16, 3), np.uint8).repeat(2, axis=1)
keys = rng.integers(0, 2**32, (8, 2), np.uint32)
augment = jax.jit(lambda v, k: augment_device.augment_batch(v, k, data))
one = np.asarray(augment(video, keys))  # [8, T, 16, 16, 3] on one device
mesh = Mesh(np.array(jax.devices()), ('data',))
batch = NamedSharding(mesh, PartitionSpec('data'))
four = jax.jit(augment, in_shardings=(batch, batch), out_shardings=batch)(
    jax.device_put(video, batch), jax.device_put(keys, batch))
mesh = Mesh(np.array(jax.devices()).reshape(4, 1), sharding.BATCH_AXES)
batch = sharding.batch_sharding(mesh)
each = jax.jit(per_device(augment, mesh), in_shardings=(batch, batch),
              out_shardings=batch)(video, keys)  # each device its own clips
print(json.dumps({
    'devices': len(four.sharding.device_set),
    'one_to_four': float(np.abs(np.asarray(four) - one).max()),
    'one_to_each_device': float(np.abs(np.asarray(each) - one).max()),
    'frame_to_frame': float(np.abs(one[:, 1] - one[:, 0]).max()),
    'other_keys_change': bool((augment(video, keys[::-1]) != one).any()),
    'replays': bool((augment(video, keys) == one).all())}))
'''


def test_a_clip_is_augmented_alike_in_every_frame_the_same_on_four_devices():
  # Two identical frames per clip, the K400 recipe, erasing 0.5. XLA's own
  # flags, as a run compiles (the tests' FAST_COMPILE rounds the
  # batch-sharded program differently).
  result = run_on_cpu_devices(MESH_SCRIPT, 4, xla_flags='')
  assert result == {'devices': 4, 'one_to_four': 0.0,
                    'one_to_each_device': 0.0, 'frame_to_frame': 0.0,
                    'other_keys_change': True, 'replays': True}
