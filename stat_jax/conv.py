"""Strided convolution with a fast input gradient.

XLA lowers the input gradient of a strided convolution to a convolution with
`lhs_dilation`, which takes a slow generic path on CPU (4-5x slower than an
explicit zero-interleave followed by an ordinary convolution; measured on the
stem and pooling convs of STAT). `conv_general_dilated` below computes the
same numbers that way. It has lax's signature, so it plugs into
`nnx.Conv(conv_general_dilated=...)`; the forward pass, and so the jaxpr that
stat_jax.flops counts, is the plain lax convolution.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _transposed_kernel(kernel, groups: int):
  """Flip the window and swap in/out features within each group.

  kernel: [*window, Cin / g, Cout] -> [*window, Cout / g, Cin].
  """
  *window, cin_group, cout = kernel.shape
  kernel = jnp.flip(kernel, axis=tuple(range(len(window))))
  kernel = kernel.reshape(*window, cin_group, groups, cout // groups)
  kernel = jnp.swapaxes(kernel, -3, -1)  # [*window, Cout/g, g, Cin/g]
  return kernel.reshape(*window, cout // groups, groups * cin_group)


def _input_gradient(grad_out, kernel, strides, padding, input_shape, groups,
                    dimension_numbers):
  """d(input) of a strided conv: zero-interleave grad_out by the strides,
  then an ordinary (stride 1) correlation with the transposed kernel."""
  spatial = len(strides)
  interleave = ([(0, 0, 0)] + [(0, 0, s - 1) for s in strides] + [(0, 0, 0)])
  dilated = lax.pad(grad_out, jnp.zeros((), grad_out.dtype), interleave)
  window = kernel.shape[:spatial]
  pads = []
  for d in range(spatial):
    low = window[d] - 1 - padding[d][0]
    high = input_shape[1 + d] - 1 + window[d] - dilated.shape[1 + d] - low
    pads.append((low, high))
  return lax.conv_general_dilated(
      dilated, _transposed_kernel(kernel, groups), (1,) * spatial, pads,
      dimension_numbers=dimension_numbers, feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _strided_conv(inputs, kernel, strides, padding, groups, dimension_numbers):
  return lax.conv_general_dilated(
      inputs, kernel, strides, padding, dimension_numbers=dimension_numbers,
      feature_group_count=groups)


def _strided_conv_fwd(inputs, kernel, strides, padding, groups, dimension_numbers):
  out = _strided_conv(inputs, kernel, strides, padding, groups, dimension_numbers)
  return out, (inputs, kernel)


def _strided_conv_bwd(strides, padding, groups, dimension_numbers, residuals,
                      grad_out):
  inputs, kernel = residuals
  _, kernel_vjp = jax.vjp(
      lambda k: _strided_conv.fun(inputs, k, strides, padding, groups,
                                  dimension_numbers), kernel)
  grad_in = _input_gradient(grad_out, kernel, strides, padding, inputs.shape,
                            groups, dimension_numbers)
  return grad_in.astype(inputs.dtype), kernel_vjp(grad_out)[0]


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
  """lax.conv_general_dilated, with the fast input gradient where it applies
  (explicit padding, channels-last, no dilation, some stride > 1)."""
  spatial = lhs.ndim - 2
  special = (
      any(s > 1 for s in window_strides) and not isinstance(padding, str)
      and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
      and batch_group_count == 1 and precision is None
      and preferred_element_type is None and out_sharding is None
      and _channels_last(dimension_numbers, spatial))
  if not special:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type, out_sharding=out_sharding)
  return _strided_conv(lhs, rhs, tuple(window_strides),
                       tuple(tuple(p) for p in padding), feature_group_count,
                       dimension_numbers)
