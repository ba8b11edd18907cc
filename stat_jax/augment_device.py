"""Clip augmentation on the device, inside the jitted train step.

The host ships uint8 clips [B, T, S, S, 3] (already cropped and resized)
and per clip the uint32 [2] key data of its randomness, drawn on the host
from (seed, epoch, position): the same clip gets the same augmentation on
any mesh and after a resume. `augment_batch` maps one clip's recipe over
the batch, one clip after another: flip, RandAugment, normalisation,
random erasing (mixup / CutMix follow in the train step,
stat_jax/mixup.py).

Every random parameter is drawn once per clip and applied to all its
frames. RandAugment follows timm's `rand-m7-n4-mstd0.5-inc1` (the MViT
recipe): each of `num_layers` ops is drawn uniformly (with replacement)
from the 15 of `apply_op`, applied with probability 0.5 at a magnitude ~ N(m,
mstd) clipped to [0, 10], geometric and signed ops taking a random sign.
AutoContrast, Equalize and Contrast use statistics of the whole clip,
computed so that a clip gets the same bits on any mesh.
Clip by clip, each layer's `lax.cond` runs an op only when the layer
applies, and its `lax.switch` the one op drawn (a geometric op warps in
its own branch): vmapped over the clips, every op would run on every clip
and one be selected, which multiplies the augmentation's memory traffic by
the number of ops.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

MAX_LEVEL = 10.0
FILL = 128.0  # grey fill of the geometric ops, as timm
# timm's ranges at MAX_LEVEL (`_signed` scales them by level / MAX_LEVEL).
_ROTATE_DEGREES = 30.
_SHEAR = 0.3  # of the other coordinate
_TRANSLATE = 0.45  # of the side
_ENHANCE = 0.9  # Color / Contrast / Brightness / Sharpness factor 1 +- this
_SOLARIZE_ADD = 110.
_PROBABILITY = 0.5  # each drawn op is applied with this probability
_GREY = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale's weights
_SHARPEN = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13


def clip_key(key_data: jax.Array) -> jax.Array:
  """uint32 [2] key data from the host -> a typed threefry key."""
  return jax.random.wrap_key_data(key_data, impl='threefry2x32')


def normalise(video: jax.Array, data) -> jax.Array:
  """uint8 (or [0, 255] float) video [..., 3] -> the model's float32 input
  (x / 255 - mean) / std = x * scale + offset per channel. The train and
  eval steps, exports and attention capture all call it."""
  std = np.asarray(data.std, np.float64)
  scale = (1 / (255 * std)).astype(np.float32)  # [3]
  offset = (-np.asarray(data.mean, np.float64) / std).astype(np.float32)
  return video.astype(jnp.float32) * scale + offset


# ---------------------------------------------------------- pixel ops ---

def _blend(degenerate, clip, factor):
  return jnp.clip(degenerate + factor * (clip - degenerate), 0., 255.)


def _grey(clip):
  return clip @ jnp.array(_GREY)  # [T, H, W]


def _clip_mean(values):
  """Mean of values [T, H, W] in [0, 255] from exact integer sums of the
  values rounded to halves: the same bits for any batch shape or sharding
  (XLA reassociates float sums differently for each)."""
  halves = jnp.round(values * 2).astype(jnp.int32)
  per_frame = halves.sum((1, 2))  # [T], exact: H W 510 < 2**31
  high, low = per_frame >> 16, per_frame & 0xFFFF  # sums of T of them exact
  total = (high.sum().astype(jnp.float32) * 65536.
           + low.sum().astype(jnp.float32))
  return total / (2 * values.size)


def affine(clip, transform):
  """clip [T, H, W, C]; output pixel (x, y) reads input (a0 x + a1 y + a2,
  b0 x + b1 y + b2), `transform` = [a0, a1, a2, b0, b1, b2]. Bilinear; a
  neighbour outside the frame reads FILL (tf's ImageProjectiveTransformV3
  with fill_mode CONSTANT)."""
  frames, height, width, channels = clip.shape
  y, x = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                      jnp.arange(width, dtype=jnp.float32), indexing='ij')
  source_x = transform[0] * x + transform[1] * y + transform[2]  # [H, W]
  source_y = transform[3] * x + transform[4] * y + transform[5]
  x0, y0 = jnp.floor(source_x), jnp.floor(source_y)
  # Each pixel's frames and channels side by side, [H, W, T C]: a read
  # gathers one run of T C values per pixel (one index pair per pixel, not
  # one per value).
  pixels_first = jnp.moveaxis(clip, 0, 2).reshape(height, width, -1)

  def read(row, column):  # [H, W, T C] of the input at integer pixels
    inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
    pixels = pixels_first[jnp.clip(row, 0, height - 1).astype(jnp.int32),
                          jnp.clip(column, 0, width - 1).astype(jnp.int32)]
    return jnp.where(inside[:, :, None], pixels, FILL)

  wx = (source_x - x0)[:, :, None]  # [H, W, 1]
  wy = (source_y - y0)[:, :, None]
  top = (1 - wx) * read(y0, x0) + wx * read(y0, x0 + 1)
  bottom = (1 - wx) * read(y0 + 1, x0) + wx * read(y0 + 1, x0 + 1)
  out = ((1 - wy) * top + wy * bottom).reshape(height, width, frames,
                                               channels)
  return jnp.moveaxis(out, 2, 0)  # [T, H, W, C]


_IDENTITY = (1., 0., 0., 0., 1., 0.)  # the `affine` transform that keeps


def rotation(degrees, height, width):
  """`affine` transform [6]: rotation about the frame centre."""
  cy, cx = (height - 1) / 2, (width - 1) / 2
  radians = degrees * math.pi / 180
  cos, sin = jnp.cos(radians), jnp.sin(radians)
  return jnp.stack([cos, -sin, cx - cos * cx + sin * cy,
                    sin, cos, cy - sin * cx - cos * cy])


def shear(amount, axis):
  """`affine` transform [6]: x += amount y (axis 2) or y += amount x (1)."""
  return jnp.array(_IDENTITY).at[1 if axis == 2 else 3].set(amount)


def translation(pixels, axis):
  """`affine` transform [6]: content shifted by round(pixels) along axis (1
  = y, 2 = x; positive: towards 0); whole pixels, so the warp is exact."""
  return jnp.array(_IDENTITY).at[2 if axis == 2 else 5].set(jnp.round(pixels))


def equalize(clip):
  """Per-channel histogram equalisation over the whole clip (PIL formula)."""
  flat = clip.reshape(-1, 3)  # [T*H*W, 3]
  levels = flat.astype(jnp.int32)

  def channel(values, ints):  # [N] float, [N] int in 0..255
    hist = jnp.bincount(ints, length=256)
    last = hist[jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))]
    step = (hist.sum() - last) // 255
    lut = (jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1)
    mapped = jnp.clip(lut, 0, 255)[ints].astype(jnp.float32)
    return jnp.where(step > 0, mapped, values)

  out = jax.vmap(channel, in_axes=1, out_axes=1)(flat, levels)
  return out.reshape(clip.shape)


def autocontrast(clip):
  """Stretch each channel's clip-wide [min, max] to [0, 255]."""
  low, high = clip.min((0, 1, 2)), clip.max((0, 1, 2))  # [C]
  spread = high > low
  scale = jnp.where(spread, 255. / jnp.maximum(high - low, 1e-3), 1.)
  offset = jnp.where(spread, -low * scale, 0.)
  return jnp.clip(clip * scale + offset, 0., 255.)


def sharpness(clip, factor):
  """Blend with the 3x3 smoothing filter (zero padding, as tf's SAME)."""
  height, width = clip.shape[1:3]
  padded = jnp.pad(clip, ((0, 0), (1, 1), (1, 1), (0, 0)))
  smooth = sum(_SHARPEN[dy, dx] * padded[:, dy:dy + height, dx:dx + width]
               for dy in range(3) for dx in range(3))
  return _blend(smooth, clip, factor)


def posterize(clip, level):
  """Keep 4 - int(4 level / 10) high bits."""
  bits = 4 - (level / MAX_LEVEL * 4).astype(jnp.int32)
  step = (2. ** (8 - bits)).astype(jnp.float32)
  return jnp.floor(clip / step) * step


# -------------------------------------------------------- RandAugment ---

def _signed(level, sign):
  return sign * level / MAX_LEVEL


# timm's 15 ops by number: the pixel ops as op(clip [T, H, W, 3] float in
# [0, 255], level, sign), the geometric ones as the `affine` transform
# [6] of (level, sign, height, width).
PIXEL_OPS = {
    0: lambda clip, level, sign: autocontrast(clip),
    1: lambda clip, level, sign: equalize(clip),
    2: lambda clip, level, sign: 255. - clip,  # Invert
    4: lambda clip, level, sign: posterize(clip, level),
    5: lambda clip, level, sign: jnp.where(  # Solarize
        clip >= 256. - level / MAX_LEVEL * 256., 255. - clip, clip),
    6: lambda clip, level, sign: jnp.where(  # SolarizeAdd
        clip < 128.,
        jnp.minimum(clip + level / MAX_LEVEL * _SOLARIZE_ADD, 255.), clip),
    7: lambda clip, level, sign: _blend(  # Color
        _grey(clip)[..., None], clip, 1. + _signed(level, sign) * _ENHANCE),
    8: lambda clip, level, sign: _blend(  # Contrast
        _clip_mean(_grey(clip)), clip, 1. + _signed(level, sign) * _ENHANCE),
    9: lambda clip, level, sign: _blend(  # Brightness
        0., clip, 1. + _signed(level, sign) * _ENHANCE),
    10: lambda clip, level, sign: sharpness(
        clip, 1. + _signed(level, sign) * _ENHANCE),
}
GEOMETRIC_OPS = {
    3: lambda level, sign, height, width: rotation(  # Rotate
        _signed(level, sign) * _ROTATE_DEGREES, height, width),
    11: lambda level, sign, height, width: shear(  # ShearX
        _signed(level, sign) * _SHEAR, axis=2),
    12: lambda level, sign, height, width: shear(  # ShearY
        _signed(level, sign) * _SHEAR, axis=1),
    13: lambda level, sign, height, width: translation(  # TranslateX
        _signed(level, sign) * _TRANSLATE * width, axis=2),
    14: lambda level, sign, height, width: translation(  # TranslateY
        _signed(level, sign) * _TRANSLATE * height, axis=1),
}
NUM_OPS = len(PIXEL_OPS) + len(GEOMETRIC_OPS)


def _warp(transform):
  """A geometric op as a pixel op: clip -> clip warped by `transform`."""
  def op(clip, level, sign):
    height, width = clip.shape[1:3]
    return affine(clip, transform(level, sign, height, width))
  return op


def apply_op(clip, op, level, sign):
  """Op number `op` (int32, may be traced) on clip [T, H, W, 3]: one
  switch, a geometric op's branch warping the clip itself. Clip by clip
  (augment_batch) the switch runs the op drawn only, so a pixel op costs
  no warp. (Vmapped, a switch runs every branch: 5 warps a layer.)"""
  branches = [PIXEL_OPS[i] if i in PIXEL_OPS else _warp(GEOMETRIC_OPS[i])
              for i in range(NUM_OPS)]
  return jax.lax.switch(op, branches, clip, level, sign)


def draw_layers(key, num_layers, magnitude, magnitude_std) -> dict:
  """One clip's RandAugment plan, [num_layers] each: 'op' int32, 'level'
  float32, 'sign' float32 +-1, 'apply' bool."""
  op_key, level_key, sign_key, apply_key = jax.random.split(key, 4)
  level = magnitude + magnitude_std * jax.random.normal(level_key,
                                                        (num_layers,))
  return {
      'op': jax.random.randint(op_key, (num_layers,), 0, NUM_OPS),
      'level': jnp.clip(level, 0., MAX_LEVEL),
      'sign': jnp.where(jax.random.bernoulli(sign_key, 0.5, (num_layers,)),
                        -1., 1.),
      'apply': jax.random.bernoulli(apply_key, _PROBABILITY, (num_layers,)),
  }


def rand_augment(clip, key, num_layers, magnitude, magnitude_std):
  """RandAugment of clip float32 [T, H, W, 3] in [0, 255] (module doc)."""
  plan = draw_layers(key, num_layers, magnitude, magnitude_std)
  for layer in range(num_layers):
    # A layer left out (probability 0.5) runs no op: a cond, not a select
    # of the op's result, which would run the op anyway.
    clip = jax.lax.cond(
        plan['apply'][layer], apply_op, lambda clip, op, level, sign: clip,
        clip, plan['op'][layer], plan['level'][layer], plan['sign'][layer])
  return clip


# ------------------------------------------------- flip, erase, batch ---

def random_flip(clip, key):
  """All frames of clip [T, H, W, C] flipped left-right, or none (p 0.5)."""
  return jnp.where(jax.random.bernoulli(key), clip[:, :, ::-1], clip)


def random_erasing(clip, key, probability, area_range=(0.02, 1 / 3),
                   log_aspect_range=(math.log(0.3), math.log(1 / 0.3))):
  """timm's pixel-mode RandomErasing (one box) on a normalised clip
  [T, H, W, C]: the same box and N(0, 1) noise in every frame."""
  area_key, aspect_key, corner_key, noise_key, apply_key = jax.random.split(
      key, 5)
  height, width, channels = clip.shape[1:]
  area = height * width * jax.random.uniform(area_key, (), minval=area_range[0],
                                             maxval=area_range[1])
  aspect = jnp.exp(jax.random.uniform(aspect_key, (),
                                      minval=log_aspect_range[0],
                                      maxval=log_aspect_range[1]))
  box_h = jnp.minimum(jnp.round(jnp.sqrt(area * aspect)), height)
  box_w = jnp.minimum(jnp.round(jnp.sqrt(area / aspect)), width)
  top, left = jnp.floor(jax.random.uniform(corner_key, (2,)) * jnp.stack(
      [height - box_h + 1, width - box_w + 1]))
  rows, columns = jnp.arange(height), jnp.arange(width)
  box = (((rows >= top) & (rows < top + box_h))[:, None]
         & ((columns >= left) & (columns < left + box_w))[None])  # [H, W]
  noise = jax.random.normal(noise_key, (height, width, channels))
  erased = jnp.where(box[:, :, None], noise, clip)
  return jnp.where(jax.random.uniform(apply_key) < probability, erased, clip)


def augment_clip(video, key_data, data):
  """One clip: uint8 [T, S, S, 3] and its key data uint32 [2] -> the
  model's float32 input [T, S, S, 3], per the data config."""
  flip_key, rand_key, erase_key = jax.random.split(clip_key(key_data), 3)
  clip = video.astype(jnp.float32)
  if data.flip:
    clip = random_flip(clip, flip_key)
  if data.randaugment_layers:
    clip = rand_augment(clip, rand_key, data.randaugment_layers,
                        data.randaugment_magnitude,
                        data.randaugment_magnitude_std)
  clip = normalise(clip, data)
  if data.random_erasing:
    clip = random_erasing(clip, erase_key, data.random_erasing)
  return clip


def augment_batch(video, key_data, data):
  """video uint8 [B, T, S, S, 3], key_data uint32 [B, 2] -> float32
  [B, T, S, S, 3]: augment_clip of every clip, one after another (a
  sequential map: give each device its own clips, as the train step does
  with shard_map, or the map runs on the whole batch)."""
  return jax.lax.map(lambda clip: augment_clip(*clip, data=data),
                     (video, key_data))
