"""config.remat (each STA block rematerialised) and config.dtype=bfloat16
through the loss and its gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import tiny
from stat_jax import flops
from stat_jax.train_state import ModelParts


def tiny_config(remat=False, dtype='float32'):
  config = tiny.get_config()
  config.remat, config.dtype = remat, dtype
  config.model.drop_path = 0.3  # the recomputed blocks must drop the same paths
  config.model.dropout = 0.2
  return config


def loss_fn(parts):
  """Cross-entropy of the train-mode model, its dropout seeded by `key`."""
  def loss(params, video, labels, key):
    model = nnx.merge(parts.train_graph, params, parts.fresh_rngs())
    nnx.reseed(model, dropout=key)
    logits = model(video).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss


def primitives(jaxpr) -> set[str]:
  """Names of the primitives in `jaxpr` and the jaxprs nested in it."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        names |= primitives(inner)
  return names


@functools.cache
def loss_and_grads(remat: bool, dtype: str):
  """(loss, gradients, primitives of the loss) of the tiny model at seed 0."""
  parts = ModelParts(tiny_config(remat, dtype))
  params = jax.jit(parts.init_params, static_argnums=0)(0)
  video = jax.random.normal(jax.random.key(1), (2, 8, 32, 32, 3))
  args = (params, video, jnp.array([3, 7]), jax.random.key(2))
  loss, grads = jax.jit(jax.value_and_grad(loss_fn(parts)))(*args)
  return loss, grads, primitives(jax.make_jaxpr(loss_fn(parts))(*args).jaxpr)


def test_remat_gives_the_same_loss_and_gradients():
  loss, grads, plain = loss_and_grads(remat=False, dtype='float32')
  remat_loss, remat_grads, remat = loss_and_grads(remat=True, dtype='float32')
  assert 'remat2' in remat and 'remat2' not in plain  # jax.checkpoint
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_remat_keeps_the_multiply_adds():
  assert (flops.model_macs(tiny_config(remat=True))
          == flops.model_macs(tiny_config(remat=False)))


def test_bfloat16_loss_and_gradients_with_remat_follow_float32():
  """bfloat16 compute with remat (the large-model recipe) against float32
  without it: float32 gradients for the float32 master weights."""
  loss, grads, _ = loss_and_grads(remat=False, dtype='float32')
  bf16_loss, bf16_grads, _ = loss_and_grads(remat=True, dtype='bfloat16')
  assert bf16_loss == pytest.approx(float(loss), rel=0.02)
  leaves, bf16_leaves = jax.tree.leaves(grads), jax.tree.leaves(bf16_grads)
  assert all(g.dtype == jnp.float32 for g in bf16_leaves)  # float32 params
  flat = jnp.concatenate([g.ravel() for g in leaves])
  bf16_flat = jnp.concatenate([g.ravel() for g in bf16_leaves])
  cosine = jnp.dot(flat, bf16_flat) / (jnp.linalg.norm(flat) * jnp.linalg.norm(bf16_flat))
  assert float(cosine) > 0.99
