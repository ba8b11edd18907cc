"""The multiply-add counter against hand counts and XLA."""

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from stat_jax import flops
from stat_jax import model as model_lib
from stat_jax.build import abstract_model


def test_dense_and_conv_hand_count():
  x = jnp.ones((3, 4))
  w = jnp.ones((4, 5))
  image = jnp.ones((1, 8, 8, 2))  # NHWC
  kernel = jnp.ones((3, 3, 2, 4))  # HWIO
  depthwise = jnp.ones((3, 3, 1, 2))  # 2 groups of 1 channel

  def fn(x, w, image, kernel, depthwise):
    dense = x @ w  # 3*5 outputs x 4 = 60
    conv = jax.lax.conv_general_dilated(  # 1*8*8*4 outputs x 3*3*2 = 4608
        image, kernel, (1, 1), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    strided = jax.lax.conv_general_dilated(  # 1*4*4*2 outputs x 3*3*1 = 288
        image, depthwise, (2, 2), 'SAME', feature_group_count=2,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    batched = jax.vmap(lambda a: a @ w)(jnp.ones((7, 3, 4)))  # 7 * 60 = 420
    return dense.sum() + conv.sum() + strided.sum() + batched.sum()

  assert flops.count_macs(fn, x, w, image, kernel, depthwise) == 60 + 4608 + 288 + 420


def test_nested_jit_and_scan_are_walked():
  w = jnp.ones((4, 4))

  def fn(x):
    inner = jax.jit(lambda a: a @ w)(x)  # 2*4 outputs x 4 = 32
    def body(carry, _):
      return carry @ w, None  # 32 per step
    out, _ = jax.lax.scan(body, x, None, length=5)  # 5 * 32 = 160
    return inner + out

  assert flops.count_macs(fn, jnp.ones((2, 4))) == 32 + 160


def test_tiny_model_agrees_with_xla_cost_analysis(monkeypatch):
  # XLA also counts element-wise flops; the exact GELU's erfc is a long
  # polynomial there (+5 % on this model), the tanh form two flops. The
  # multiply-adds counted are the same either way.
  monkeypatch.setattr(model_lib, 'gelu', jax.nn.gelu)
  config = tiny.get_config()
  config.model.stage_dims = (32, 64, 128, 256)  # wide enough that dots dominate
  model = abstract_model(config)
  forward, state, view = flops.model_forward(model, config)
  macs = flops.count_macs(forward, state, view)
  concrete = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
  xla = flops.xla_flops(forward, concrete, jnp.zeros(view.shape))
  assert macs == pytest.approx(xla / 2, rel=0.02)


def test_the_model_count_is_the_same_for_every_implementation():
  # A Pallas kernel's jaxpr is one grid step: the count reads the XLA form,
  # and leaves the caller's config as it was.
  config = tiny.get_config()
  xla = flops.model_macs(config)
  config.model.attention_impl = 'pallas'
  config.model.mlp_impl = 'pallas'
  assert flops.model_macs(config) == xla
  assert (config.model.attention_impl, config.model.mlp_impl) == (
      'pallas', 'pallas')


def test_the_command_line_prints_the_xla_form_count(capsys):
  args = ['--config=configs/tiny.py']
  assert flops.main(args) == 0
  xla = capsys.readouterr().out
  assert flops.main([*args, '--config.model.attention_impl=pallas',
                     '--config.model.mlp_impl=pallas']) == 0
  pallas = capsys.readouterr().out
  gmacs = [line for line in xla.splitlines() if line.startswith('GMACs')]
  assert gmacs and gmacs == [line for line in pallas.splitlines()
                             if line.startswith('GMACs')]
