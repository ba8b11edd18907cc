"""The strided convolution with the fast input gradient equals lax's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from stat_jax import conv

CASES = [  # input shape, kernel shape (window + [Cin/g, Cout]), strides, groups
    ((2, 7, 9, 11, 4), (3, 3, 3, 4, 6), (2, 2, 2), 1),  # stem, odd sizes
    ((2, 4, 8, 8, 3), (3, 7, 7, 3, 5), (2, 4, 4), 1),  # Table 5 1-layer stem
    ((3, 8, 8, 6), (3, 3, 1, 6), (4, 4), 6),  # depthwise K/V pooling
    ((3, 7, 7, 4), (3, 3, 2, 6), (2, 2), 2),  # grouped, odd size
]


@pytest.mark.parametrize('in_shape,kernel_shape,strides,groups', CASES)
def test_values_and_gradients_match_lax(in_shape, kernel_shape, strides, groups):
  spatial = len(strides)
  x = jax.random.normal(jax.random.key(0), in_shape)
  w = jax.random.normal(jax.random.key(1), kernel_shape)
  padding = [(k // 2, k // 2) for k in kernel_shape[:spatial]]
  layout = ('NDHWC', 'DHWIO', 'NDHWC') if spatial == 3 else ('NHWC', 'HWIO', 'NHWC')
  numbers = lax.conv_dimension_numbers(in_shape, kernel_shape, layout)

  def loss(fn, x, w):
    y = fn(x, w, strides, padding, dimension_numbers=numbers,
           feature_group_count=groups)
    return (y * jnp.cos(y)).sum()  # a non-trivial upstream gradient

  ours = jax.grad(lambda x, w: loss(conv.conv_general_dilated, x, w), (0, 1))(x, w)
  ref = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1))(x, w)
  np.testing.assert_allclose(
      conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=numbers,
                                feature_group_count=groups),
      lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=numbers,
                               feature_group_count=groups), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-4)
