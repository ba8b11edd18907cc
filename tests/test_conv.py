"""The convolutions of stat_jax.conv (depthwise as shifted multiply-adds,
few-channel as patches x kernel, strided with tap-dot gradients) against
lax's, and their multiply-adds as stat_jax.flops counts them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from stat_jax import conv, flops

CASES = [  # input shape, kernel shape (window + [Cin/g, Cout]), strides, groups
    ((2, 7, 9, 11, 4), (3, 3, 3, 4, 6), (2, 2, 2), 1),  # stem, few channels
    ((2, 4, 8, 8, 3), (3, 7, 7, 3, 5), (2, 4, 4), 1),  # Table 5 1-layer stem
    ((2, 5, 9, 9, 8), (3, 3, 3, 8, 4), (1, 2, 2), 1),  # stem conv 2, odd size
    ((2, 9, 9, 8), (3, 3, 8, 4), (2, 2), 1),  # dense 2D, strided
    ((3, 8, 8, 6), (3, 3, 1, 6), (4, 4), 6),  # depthwise K/V pooling
    ((3, 7, 7, 6), (3, 3, 1, 6), (2, 2), 6),  # depthwise Q pooling, odd size
    ((3, 6, 5, 6), (3, 3, 1, 6), (1, 1), 6),  # depthwise, stride 1
    ((3, 7, 7, 4), (3, 3, 2, 6), (2, 2), 2),  # grouped, odd size
]


def conv_case(in_shape, kernel_shape, strides, groups, dtype=jnp.float32):
  """(x, w, fn(conv_impl, x, w) -> the convolution) of one case."""
  spatial = len(strides)
  x = jax.random.normal(jax.random.key(0), in_shape, dtype)
  w = jax.random.normal(jax.random.key(1), kernel_shape, dtype)
  padding = [(k // 2, k // 2) for k in kernel_shape[:spatial]]
  layout = ('NDHWC', 'DHWIO', 'NDHWC') if spatial == 3 else ('NHWC', 'HWIO', 'NHWC')
  numbers = lax.conv_dimension_numbers(in_shape, kernel_shape, layout)

  def apply(impl, x, w):
    return impl(x, w, strides, padding, dimension_numbers=numbers,
                feature_group_count=groups)
  return x, w, apply


@functools.partial(jax.jit, static_argnums=(0, 1))
def values_and_gradients(apply, impl, x, w):
  def loss(x, w):
    y = apply(impl, x, w)
    return (y * jnp.cos(y)).sum()  # a non-trivial upstream gradient
  return (apply(impl, x, w), *jax.grad(loss, (0, 1))(x, w))


@pytest.mark.parametrize('in_shape,kernel_shape,strides,groups', CASES)
def test_values_and_gradients_as_accurate_as_lax(in_shape, kernel_shape,
                                                strides, groups):
  """Summed in another order, ours may differ from lax in float32 by more
  than a fixed tolerance; both must be as close to the float64 result."""
  x, w, apply = conv_case(in_shape, kernel_shape, strides, groups)
  ours = values_and_gradients(apply, conv.conv_general_dilated, x, w)
  ref = values_and_gradients(apply, lax.conv_general_dilated, x, w)
  with jax.enable_x64(True):
    exact = values_and_gradients(apply, lax.conv_general_dilated,
                                 *(jnp.asarray(np.asarray(a), jnp.float64)
                                   for a in (x, w)))
  for got, want, truth in zip(ours, ref, exact):
    truth = np.asarray(truth)
    assert got.shape == truth.shape and got.dtype == jnp.float32
    lax_error = np.abs(np.asarray(want) - truth).max()
    assert np.abs(np.asarray(got) - truth).max() <= (
        2 * lax_error + 1e-6 * np.abs(truth).max())


@pytest.mark.parametrize('in_shape,kernel_shape,strides,groups', CASES)
def test_multiply_adds_counted_as_the_convolution(in_shape, kernel_shape,
                                                  strides, groups):
  x, w, apply = conv_case(in_shape, kernel_shape, strides, groups)
  count = lambda impl: flops.count_macs(lambda x, w: apply(impl, x, w), x, w)
  assert count(conv.conv_general_dilated) == count(lax.conv_general_dilated)


def test_bfloat16_keeps_the_dtype():
  for case in (CASES[0], CASES[2], CASES[4]):  # patches, tap dots, depthwise
    x, w, apply = conv_case(*case, dtype=jnp.bfloat16)
    ours = values_and_gradients(apply, conv.conv_general_dilated, x, w)
    ref = values_and_gradients(apply, lax.conv_general_dilated, x, w)
    for got, want in zip(ours, ref):
      assert got.dtype == jnp.bfloat16
      scale = float(jnp.abs(want.astype(jnp.float32)).max())
      np.testing.assert_allclose(np.asarray(got, np.float32),
                                 np.asarray(want, np.float32), atol=0.03 * scale)


def test_auto_is_the_rewrite_on_cpu_only(monkeypatch):
  assert conv.resolve_conv_impl('auto', 'cpu') == 'cpu'
  for platform in ('gpu', 'tpu'):
    assert conv.resolve_conv_impl('auto', platform) == 'xla'
  assert conv.resolve_conv_impl('cpu', 'gpu') == 'cpu'
  assert conv.resolve_conv_impl('xla', 'cpu') == 'xla'
  assert conv.conv_function('auto') is conv.conv_general_dilated  # CPU here
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert conv.conv_function('auto') is lax.conv_general_dilated
