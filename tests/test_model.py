"""STAT end to end: shapes through every stage, parameter count, modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import k400, ssv2, tiny
from stat_jax.checks.config import ConfigError
from stat_jax import defaults
from stat_jax import model as model_lib
from stat_jax.flops import param_count
from stat_jax.build import abstract_model, build_model
from stat_jax.model import STAT


forward = nnx.jit(lambda model, video: model(video))


def built(config, build=build_model):
  """`build(config, rngs=nnx.Rngs(0))` initialised by one compiled program
  (eager initialisation dispatches each op on its own: several times slower)."""
  return nnx.jit(lambda: build(config, rngs=nnx.Rngs(0)))()


def token_shapes(config):
  """Shape of the tokens after the stem and after every block (abstractly)."""
  model = abstract_model(config)
  graphdef, state = nnx.split(model)
  video = jax.ShapeDtypeStruct((1, *defaults.clip_shape(config.data)),
                               jnp.float32)

  def trace(state, video):
    model = nnx.merge(graphdef, state)
    x, grid = model.tokens(video)
    shapes = [x]
    for block in model.blocks:
      x, grid = block(x, grid)
      shapes.append(x)
    return shapes, model(video)

  shapes, logits = jax.eval_shape(trace, state, video)
  return [s.shape for s in shapes], logits.shape


@pytest.mark.parametrize('frames', [16, 32, 64])
def test_token_shapes_through_every_stage(frames):
  config = k400.get_config(str(frames))
  shapes, logits = token_shapes(config)
  nt = frames // 2
  # 224 / 8 = 28x28 patches (+1 cls) at 192; Q pooling at the first block of
  # stages 2 and 3 quarters the tokens; the last block of a stage widens.
  expected = ([(1, nt, 785, 192)] * 2 + [(1, nt, 785, 384)]
              + [(1, nt, 197, 384)] * 10 + [(1, nt, 197, 768)]
              + [(1, nt, 50, 768)] * 2)
  assert shapes == expected
  assert logits == (1, 400)


def test_ssv2_head_and_avgpool_summary_shapes():
  config = ssv2.get_config('16')
  config.model.spatial_summary = 'avgpool'
  shapes, logits = token_shapes(config)
  assert shapes[0] == (1, 8, 784, 192) and shapes[-1] == (1, 8, 49, 768)
  assert logits == (1, 174)


def block_params(dim, dim_out, heads, q_pool):
  head_dim = dim // heads
  pool = 9 * head_dim + 2 * head_dim  # depthwise 3x3 conv (no bias) + LayerNorm
  count = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim)
  count += pool * (3 if q_pool else 2) + 2 * dim
  count += dim * 4 * dim + 4 * dim + 4 * dim * dim_out + dim_out
  if dim_out != dim:
    count += dim * dim_out + dim_out
  return count


def test_parameter_count_of_k400_16_by_hand():
  stem = (27 * 3 * 64 + 64 + 2 * 64) + (27 * 64 * 96 + 96 + 2 * 96) + (
      27 * 96 * 192 + 192)
  embeddings = 192 + 785 * 192 + 8 * 192  # cls, spatial, temporal
  blocks = [(192, 192, 2, False), (192, 384, 2, False), (384, 384, 4, True)]
  blocks += [(384, 384, 4, False)] * 9 + [(384, 768, 4, False)]
  blocks += [(768, 768, 8, True), (768, 768, 8, False)]
  c = 768
  aggregation = c + 2 * c + (4 * c * c + 4 * c)  # video cls, LN, MHSA: no MLP
  head = 2 * c + c * 400 + 400
  expected = stem + embeddings + sum(block_params(*b) for b in blocks)
  expected += aggregation + head
  assert param_count(abstract_model(k400.get_config('16'))) == expected


def test_lta_zero_has_no_temporal_layers():
  config = k400.get_config('16')
  with_lta = param_count(abstract_model(config))
  config.model.lta = 0
  c = 768
  assert with_lta - param_count(abstract_model(config)) == (
      2 * c + (4 * c * c + 4 * c))  # LN + MHSA (q, k, v, out)


def test_lta_mlp_switch_adds_a_transformer_mlp():
  config = k400.get_config('16')
  light = param_count(abstract_model(config))
  config.model.lta_mlp = True
  c = 768
  assert param_count(abstract_model(config)) - light == (
      2 * c + (8 * c * c + 5 * c))  # LN + MLP (c -> 4c -> c)


@pytest.mark.parametrize('stem_layers,grid', [(1, (8, 56)), (5, (4, 7))])
def test_table5_stems(stem_layers, grid):
  config = k400.get_config('16')
  config.model.stem_layers = stem_layers
  shapes, logits = token_shapes(config)
  nt, side = grid
  assert shapes[0][:3] == (1, nt, 1 + side * side)
  assert shapes[-1][1:3] == (nt, 50)  # all variants end on 7x7 tokens
  assert logits == (1, 400)


def test_tiny_forward_train_and_eval_modes():
  config = tiny.get_config()
  config.model.dropout = 0.5
  model = built(config)
  video = jax.random.normal(jax.random.key(0), (3, 8, 32, 32, 3))
  model.eval()
  first, second = forward(model, video), forward(model, video)
  assert first.shape == (3, 12) and np.all(np.isfinite(first))
  np.testing.assert_array_equal(first, second)  # deterministic in eval
  model.train()
  assert not np.allclose(forward(model, video), forward(model, video))
  model.eval()
  np.testing.assert_array_equal(forward(model, video), first)


def test_clips_are_independent_in_a_batch():
  model = built(tiny.get_config())
  model.eval()
  video = jax.random.normal(jax.random.key(1), (2, 8, 32, 32, 3))
  together = forward(model, video)
  alone = forward(model, video[1:])
  np.testing.assert_allclose(together[1:], alone, rtol=1e-5, atol=1e-6)


def test_wrong_input_shape_is_named():
  model = built(tiny.get_config())
  with pytest.raises(ValueError, match=r'expects video \[B, 8, 32, 32, 3\].*got'):
    forward(model, jnp.zeros((1, 8, 64, 64, 3)))  # refused while tracing


def test_bfloat16_compute_keeps_float32_params():
  config = tiny.get_config()
  config.dtype = 'bfloat16'
  model = built(config)
  model.eval()
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in leaves)
  logits = forward(model, jnp.ones((1, 8, 32, 32, 3)))
  assert logits.dtype == jnp.bfloat16 and math.isfinite(float(logits[0, 0]))


def test_bfloat16_forward_follows_float32():
  config = tiny.get_config()
  video = jax.random.normal(jax.random.key(2), (2, 8, 32, 32, 3))
  logits = {}
  for dtype in ('float32', 'bfloat16'):
    config.dtype = dtype
    model = built(config)  # the same parameters
    model.eval()
    logits[dtype] = np.asarray(forward(model, video), np.float32)
  scale = np.abs(logits['float32']).max()
  np.testing.assert_allclose(logits['bfloat16'], logits['float32'],
                             atol=0.05 * scale)


@pytest.mark.parametrize('key,value,message', [
    ('conv_impl', 'cudnn', r"model.conv_impl.*'cudnn'.*cpu, xla, auto"),
    ('head_layout', 'bhnd',
     r"model.head_layout.*'bhnd'.*products, fused_product, transposed, auto"),
    ('mlp_impl', 'triton', r"model.mlp_impl.*'triton'.*auto, xla, pallas"),
])
def test_kernel_choices_are_validated(key, value, message):
  config = tiny.get_config()
  config.model[key] = value
  with pytest.raises(ConfigError, match=message):
    build_model(config, nnx.Rngs(0))


def test_auto_kernel_choices_settle_for_the_target_platform():
  """aot.py compiles TPU programs on a CPU host: 'auto' must follow the
  target, not the host's backend; explicit choices stay."""
  config = tiny.get_config()
  config.dtype = 'auto'
  model_lib.resolve_for_platform(config, 'tpu')
  assert config.dtype == 'bfloat16'
  assert (config.model.conv_impl, config.model.head_layout) == ('xla', 'products')
  assert config.model.attention_impl == 'pallas'
  config = tiny.get_config()
  config.model.conv_impl, config.dtype = 'cpu', 'float32'
  model_lib.resolve_for_platform(config, 'gpu')
  assert config.dtype == 'float32'
  assert (config.model.conv_impl, config.model.head_layout) == ('cpu', 'fused_product')
  config = tiny.get_config()
  config.dtype = 'auto'
  model_lib.resolve_for_platform(config, None)  # this host: the CPU
  assert config.dtype == 'float32'
  assert (config.model.conv_impl, config.model.head_layout) == ('cpu', 'transposed')


def test_the_kinetics_and_ssv2_configs_compute_in_bfloat16_on_accelerators():
  """dtype 'auto': bfloat16 on TPU and GPU, float32 on the CPU; the
  parameters stay float32 (a model built here, on the CPU, computes in
  float32)."""
  for module in (k400, ssv2):
    config = module.get_config('16')
    assert config.dtype == 'auto'
    assert [model_lib.resolve_dtype(config.dtype, p)
            for p in ('tpu', 'gpu', 'cpu')] == ['bfloat16', 'bfloat16', 'float32']
  config = tiny.get_config()
  config.dtype = 'auto'
  model = abstract_model(config)
  assert model.head.dtype == model.blocks[0].mlp.fc1.dtype == jnp.float32
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_every_conv_impl_gives_the_same_logits_and_gradients():
  """The stem and pooling convs rewritten for XLA:CPU ('cpu') against
  lax's own ('xla'), forward and backward through the whole model."""
  config = tiny.get_config()
  video = jax.random.normal(jax.random.key(3), (2, 8, 32, 32, 3))

  def loss(model):
    logits = model(video)
    return (logits * jnp.cos(logits)).sum()

  results = {}
  for impl in ('cpu', 'xla'):
    config.model.conv_impl = impl
    model = built(config)
    model.eval()
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    results[impl] = value, jax.tree.leaves(nnx.state(grads, nnx.Param))
  (cpu_loss, cpu_grads), (xla_loss, xla_grads) = results['cpu'], results['xla']
  np.testing.assert_allclose(cpu_loss, xla_loss, rtol=1e-5)
  assert len(cpu_grads) == len(xla_grads) > 0
  for got, want in zip(cpu_grads, xla_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want).max()) + 1e-7)


@pytest.mark.parametrize('impl,dtype,message', [
    ('flash', 'float32', r'model.attention_impl.*xla, cudnn, pallas, auto'),
    ('cudnn', 'float32', r"cudnn needs dtype bfloat16 or float16.*'float32'"),
])
def test_attention_impl_is_validated(impl, dtype, message):
  config = tiny.get_config()
  config.model.attention_impl, config.dtype = impl, dtype
  with pytest.raises(ConfigError, match=message):
    build_model(config, nnx.Rngs(0))


def test_every_attention_impl_gives_the_same_logits(monkeypatch):
  """'cudnn' answered by jax.nn.dot_product_attention's 'xla' path (no GPU
  here): the packed frames give the model's logits."""
  original = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention', lambda *a, **k: original(
      *a, **{**k, 'implementation': 'xla'}))
  config = tiny.get_config()
  video = jax.random.normal(jax.random.key(3), (2, 8, 32, 32, 3))
  logits = {}
  for impl in ('xla', 'cudnn', 'auto'):
    config.model.attention_impl = impl
    model = built(config, STAT)  # validation would refuse float32 cudnn
    model.eval()
    logits[impl] = forward(model, video)
  np.testing.assert_allclose(logits['cudnn'], logits['xla'], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(logits['auto'], logits['xla'])  # CPU: xla


def primitive_names(jaxpr) -> set:
  """Names of every primitive in `jaxpr` and the jaxprs nested in it."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          names |= primitive_names(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          names |= primitive_names(sub)
  return names


def test_gelu_is_the_exact_erf_form():
  """MViT / PySlowFast use torch.nn.GELU (erf); jax.nn.gelu's default is the
  tanh approximation. The model (stem, MLPs, lta MLP) has no tanh."""
  config = tiny.get_config()
  config.model.lta_mlp = True
  graphdef, state = nnx.split(abstract_model(config))
  video = jax.ShapeDtypeStruct((1, 8, 32, 32, 3), jnp.float32)
  names = primitive_names(jax.make_jaxpr(
      lambda state, video: nnx.merge(graphdef, state)(video))(state, video).jaxpr)
  # jax.nn.gelu(approximate=False) is 0.5 x erfc(-x / sqrt 2).
  assert names & {'erf', 'erfc'} and 'tanh' not in names
