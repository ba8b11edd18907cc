"""The tf / tf.image RandAugment that ran on the host before the device
one (stat_jax/augment_device.py) replaced it: the reference its tests
compare against, op by op and for whole plans.

Ops (timm's `rand-m7-n4-mstd0.5-inc1`): AutoContrast, Equalize, Invert,
Rotate (30 deg at m=10), Posterize (4 - 4m/10 bits kept), Solarize
(threshold 256 - 25.6m), SolarizeAdd (+11m below 128), Color / Contrast /
Brightness / Sharpness (factor 1 +- 0.09m), ShearX / ShearY (0.03m),
TranslateX / TranslateY (4.5m % of the side, rounded to whole pixels).
AutoContrast and Equalize use statistics of the whole clip.
"""

import math

import tensorflow as tf

_MAX_LEVEL = 10.0
_FILL = 128.0  # grey fill for geometric ops, as timm


def _blend(degenerate, clip, factor):
  return tf.clip_by_value(degenerate + factor * (clip - degenerate), 0., 255.)


def _grey(clip):
  return tf.image.rgb_to_grayscale(clip)  # [T, H, W, 1]


def _affine(clip, transform):
  """Maps each output pixel (x, y) to input a0 x + a1 y + a2, b0 x + b1 y + b2."""
  shape = tf.shape(clip)[1:3]
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=clip, transforms=tf.reshape(tf.concat([transform, [0., 0.]], 0),
                                         [1, 8]),
      output_shape=shape, fill_value=_FILL, interpolation='BILINEAR',
      fill_mode='CONSTANT')


def _translate(clip, pixels, axis):
  """Shift the content by round(pixels) along axis (1 = y, 2 = x; positive:
  towards 0), grey fill: output[i] = input[i + shift], as `_affine` with
  offset `pixels`, at whole pixels (pad + slice: cheaper than the warp)."""
  size = tf.shape(clip)[axis]
  shift = tf.clip_by_value(tf.cast(tf.round(pixels), tf.int32), -size, size)
  pad = tf.abs(shift)
  axis_row = tf.one_hot(axis, 4, dtype=tf.int32)  # [4]
  padded = tf.pad(clip, axis_row[:, None] * tf.stack([pad, pad]),
                  constant_values=_FILL)
  return tf.slice(padded, axis_row * (pad + shift), tf.shape(clip))


def _rotate(clip, degrees):
  shape = tf.cast(tf.shape(clip)[1:3], tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  cos, sin = tf.cos(degrees * math.pi / 180), tf.sin(degrees * math.pi / 180)
  return _affine(clip, tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                                 sin, cos, cy - sin * cx - cos * cy]))


def _equalize(clip):
  """Per-channel histogram equalisation over the whole clip (PIL formula)."""
  def channel(values):  # [N] float in [0, 255]
    ints = tf.cast(values, tf.int32)
    hist = tf.math.bincount(ints, minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)[:, 0]))
    step = (tf.reduce_sum(hist) - last) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    mapped = tf.cast(tf.gather(tf.clip_by_value(lut, 0, 255), ints), tf.float32)
    return tf.where(step > 0, mapped, values)
  flat = tf.reshape(clip, [-1, 3])  # [T*H*W, 3]
  out = tf.stack([channel(flat[:, c]) for c in range(3)], -1)
  return tf.reshape(out, tf.shape(clip))


def _channel_extreme(reduce, clip):
  """Per-channel reduce_min / reduce_max over [T, H, W] -> [3], as rows of
  W*3 values first: one reduction instead of three over the leading axes."""
  rows = reduce(tf.reshape(clip, [-1, tf.shape(clip)[2] * 3]), 0)  # [W*3]
  return reduce(tf.reshape(rows, [-1, 3]), 0)


def _autocontrast(clip):
  """Stretch each channel's clip-wide [min, max] to [0, 255]."""
  low = _channel_extreme(tf.reduce_min, clip)
  high = _channel_extreme(tf.reduce_max, clip)
  spread = high > low
  scale = tf.where(spread, 255. / tf.maximum(high - low, 1e-3), 1.)
  offset = tf.where(spread, -low * scale, 0.)
  return tf.clip_by_value(clip * scale + offset, 0., 255.)


def _sharpness(clip, factor):
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(clip, kernel, [1, 1, 1, 1], 'SAME')
  return _blend(smooth, clip, factor)


def _posterize(clip, level):
  bits = 4 - tf.cast(level / _MAX_LEVEL * 4, tf.int32)
  shift = tf.cast(8 - bits, tf.float32)
  return tf.floor(clip / 2 ** shift) * 2 ** shift


def rand_augment_ops(clip, level, sign):
  """The 15 ops as zero-argument callables for tf.switch_case."""
  signed = sign * level / _MAX_LEVEL
  factor = 1. + signed * 0.9
  shear = signed * 0.3
  shape = tf.cast(tf.shape(clip)[1:3], tf.float32)
  shift = signed * 0.45
  return [
      lambda: _autocontrast(clip),
      lambda: _equalize(clip),
      lambda: 255. - clip,
      lambda: _rotate(clip, signed * 30.),
      lambda: _posterize(clip, level),
      lambda: tf.where(clip >= 256. - level / _MAX_LEVEL * 256., 255. - clip,
                       clip),
      lambda: tf.where(clip < 128., tf.minimum(clip + level / _MAX_LEVEL * 110.,
                                               255.), clip),
      lambda: _blend(_grey(clip), clip, factor),
      lambda: _blend(tf.reduce_mean(_grey(clip)), clip, factor),
      lambda: _blend(tf.zeros_like(clip), clip, factor),
      lambda: _sharpness(clip, factor),
      lambda: _affine(clip, tf.stack([1., shear, 0., 0., 1., 0.])),
      lambda: _affine(clip, tf.stack([1., 0., 0., shear, 1., 0.])),
      lambda: _translate(clip, shift * shape[1], axis=2),
      lambda: _translate(clip, shift * shape[0], axis=1),
  ]


def rand_augment(clip, plan):
  """RandAugment of clip float32 [T, H, W, 3] in [0, 255] by a plan of
  augment_device.draw_layers (numpy arrays [num_layers] each)."""
  for op, level, sign, apply in zip(plan['op'], plan['level'], plan['sign'],
                                    plan['apply']):
    if apply:
      clip = rand_augment_ops(clip, tf.constant(level, tf.float32),
                              tf.constant(sign, tf.float32))[op]()
  return clip
