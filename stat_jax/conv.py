"""Convolutions computed the way XLA:CPU runs them fast; same numbers as lax.

`model.conv_impl` picks them ('cpu') or lax's own convolution ('xla': XLA's
kernels, cuDNN on a GPU); 'auto' is 'cpu' on the CPU backend only. On a GPU
the forms below cost memory traffic that cuDNN does not: `patches_conv`
writes the patches out (9x-27x the input) and the gradients of
`tap_dots_conv` go through float32 patch gradients (benchmarks/RESULTS.md
has the bytes per clip of both).

`conv_general_dilated` has lax's signature, so it plugs into
`nnx.Conv(conv_general_dilated=...)`. Where it applies (explicit padding,
channels-last, no dilation) it picks one of:

- `depthwise_conv` (one filter per channel: the K/V/Q pooling convs): the
  sum over the window of shifted, strided slices times the taps. XLA:CPU runs
  grouped convs on a slow generic path; this form is element-wise, so XLA
  fuses it on every backend. stat_jax.flops counts it as the convolution.
- `patches_conv` (dense, few input channels: the RGB video into the first
  stem conv): its patches, gathered channel-major so each tap is one strided
  copy, times the kernel matrix: with few input channels a dot uses the CPU
  better than XLA:CPU's convolution, and it has exactly the convolution's
  multiply-adds.
- `_strided_conv` (other dense strided convs: stem convs 2 and 3): lax's
  forward, but the gradients of `tap_dots_conv`, the same convolution as one
  dot per tap of the first spatial axis over the patches of the others. XLA
  lowers a strided conv's input gradient to a conv with `lhs_dilation` and
  its kernel gradient to one with `rhs_dilation`, both on a slow generic
  path on CPU; one dot per tap avoids it.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Inputs with fewer channels than this convolve faster as patches x kernel.
FEW_CHANNELS = 8
CONV_IMPLS = ('cpu', 'xla', 'auto')


def resolve_conv_impl(impl: str, platform: str | None = None) -> str:
  """'cpu' or 'xla' for CONV_IMPLS `impl` on `platform` (default: the
  default backend's): 'auto' is 'cpu' on 'cpu', 'xla' on GPUs and TPUs."""
  if impl != 'auto':
    return impl
  return 'cpu' if (platform or jax.default_backend()) == 'cpu' else 'xla'


def conv_function(impl: str):
  """The `conv_general_dilated` of CONV_IMPLS `impl`, for nnx.Conv."""
  if resolve_conv_impl(impl) == 'cpu':
    return conv_general_dilated
  return lax.conv_general_dilated


def _window_slices(x, first: int, window, strides, out_shape):
  """The strided slice of `x` under every window tap (row-major tap order),
  spatial axes `first`.. of `x`, each `out_shape` there."""
  for tap in itertools.product(*(range(k) for k in window)):
    start, limit, step = [0] * x.ndim, list(x.shape), [1] * x.ndim
    for axis, t, o, s in zip(range(first, x.ndim), tap, out_shape, strides):
      start[axis], limit[axis], step[axis] = t, t + (o - 1) * s + 1, s
    yield tap, lax.slice(x, start, limit, step)


def _padded_and_out_shape(inputs, window, strides, padding):
  """inputs [N, *spatial, C] padded, and the conv's output spatial shape."""
  padded = jnp.pad(inputs, [(0, 0), *padding, (0, 0)])
  out_shape = [(size - k) // s + 1
               for size, k, s in zip(padded.shape[1:-1], window, strides)]
  return padded, out_shape


@functools.partial(jax.jit, static_argnums=(2, 3))
def depthwise_conv(inputs, kernel, strides, padding):
  """Depthwise conv as a sum over the window of strided slices x the taps.

  inputs: [N, *spatial, C]; kernel: [*window, 1, C]; explicit padding.
  Accumulates in float32 like a convolution does.
  """
  window = kernel.shape[:-2]
  padded, out_shape = _padded_and_out_shape(inputs, window, strides, padding)
  total = jnp.zeros((inputs.shape[0], *out_shape, inputs.shape[-1]), jnp.float32)
  for tap, shifted in _window_slices(padded, 1, window, strides, out_shape):
    total += shifted.astype(jnp.float32) * kernel[tap][0].astype(jnp.float32)
  return total.astype(jnp.result_type(inputs, kernel))


def patches_conv(inputs, kernel, strides, padding):
  """Dense conv as its patches [taps * C, positions] times the kernel matrix.

  inputs: [N, *spatial, C]; kernel: [*window, C, O] -> [N, *out, O].
  """
  window, features = kernel.shape[:-2], kernel.shape[-1]
  padded, out_shape = _padded_and_out_shape(inputs, window, strides, padding)
  # Channel-major, each tap's slice is one strided copy: [N, C, *out].
  planar = jnp.moveaxis(padded, -1, 1)
  taps = [x for _, x in _window_slices(planar, 2, window, strides, out_shape)]
  patches = jnp.stack(taps, axis=1)  # [N, taps, C, *out]
  patches = patches.reshape(inputs.shape[0], -1, math.prod(out_shape))
  out = jnp.einsum('nkp,ko->npo', patches, kernel.reshape(-1, features))
  return out.reshape(inputs.shape[0], *out_shape, features)


def tap_dots_conv(inputs, kernel, strides, padding):
  """Dense conv as one dot per tap of the first spatial axis, contracting
  the patches of the other spatial axes (channels-last, taps x C wide).

  inputs: [N, *spatial, C]; kernel: [*window, C, O] -> [N, *out, O].
  """
  window, features = kernel.shape[:-2], kernel.shape[-1]
  padded, out_shape = _padded_and_out_shape(inputs, window, strides, padding)
  rest = [x for _, x in _window_slices(padded, 2, window[1:], strides[1:],
                                       out_shape[1:])]
  patches = jnp.concatenate(rest, axis=-1)  # [N, padded s0, *out[1:], taps * C]
  total = 0
  for (tap,), rows in _window_slices(patches, 1, window[:1], strides[:1],
                                     out_shape[:1]):
    total += jnp.einsum('n...k,ko->n...o', rows,
                        kernel[tap].reshape(-1, features),
                        preferred_element_type=jnp.float32)
  return total.astype(jnp.result_type(inputs, kernel))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(inputs, kernel, strides, padding, dimension_numbers):
  return lax.conv_general_dilated(inputs, kernel, strides, padding,
                                  dimension_numbers=dimension_numbers)


def _strided_conv_fwd(inputs, kernel, strides, padding, dimension_numbers):
  out = _strided_conv(inputs, kernel, strides, padding, dimension_numbers)
  return out, (inputs, kernel)


def _strided_conv_bwd(strides, padding, dimension_numbers, residuals, grad_out):
  del dimension_numbers  # channels-last, checked by conv_general_dilated
  inputs, kernel = residuals
  _, vjp = jax.vjp(lambda x, k: tap_dots_conv(x, k, strides, padding),
                   inputs, kernel)
  return vjp(grad_out.astype(jnp.result_type(inputs, kernel)))


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _channels_last(dimension_numbers, spatial: int) -> bool:
  """True for ('N...C', '...IO', 'N...C'), the layout nnx.Conv uses."""
  dims = lax.conv_dimension_numbers((1,) * (spatial + 2), (1,) * (spatial + 2),
                                    dimension_numbers)
  last = spatial + 1
  return (dims.lhs_spec[:2] == (0, last) and dims.out_spec[:2] == (0, last)
          and dims.rhs_spec[:2] == (last, spatial))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None,
                         out_sharding=None):
  """lax.conv_general_dilated, computed as the module docstring says where
  that applies (explicit padding, channels-last, no dilation)."""
  spatial = lhs.ndim - 2
  plain = (
      not isinstance(padding, str)
      and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
      and batch_group_count == 1 and precision is None
      and preferred_element_type is None and out_sharding is None
      and _channels_last(dimension_numbers, spatial))
  strides = tuple(window_strides)
  if plain:
    padding = tuple(map(tuple, padding))
    if feature_group_count == lhs.shape[-1] == rhs.shape[-1]:
      return depthwise_conv(lhs, rhs, strides, padding)
    if feature_group_count == 1 and lhs.shape[-1] < FEW_CHANNELS:
      return patches_conv(lhs, rhs, strides, padding)
    if feature_group_count == 1 and any(s > 1 for s in strides):
      return _strided_conv(lhs, rhs, strides, padding, dimension_numbers)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count, precision,
      preferred_element_type, out_sharding=out_sharding)
