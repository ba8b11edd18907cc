"""stat_jax/optim.py: AdamW with the small parameter arrays updated
together, against optax's AdamW applied array by array."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import tiny
from stat_jax import optim

# A parameter tree with one array of each kind: a large matrix, a small
# conv kernel (decays), a bias and a class token (no decay).
PARAMS = {
    'fc': {'kernel': jnp.arange(64 * 80, dtype=jnp.float32).reshape(64, 80) / 5e3,
           'bias': jnp.linspace(-1, 1, 80)},
    'pool': {'kernel': jnp.linspace(0, 1, 3 * 3 * 1 * 8).reshape(3, 3, 1, 8)},
    'cls_token': jnp.full((1, 1, 1, 8), 0.5),
}


def test_arrays_are_grouped_by_size_and_decay_and_come_back_whole():
  groups = optim._group_names(PARAMS)  # tree order: cls_token, fc, pool
  assert groups == ['small_no_decay', 'small_no_decay', 'large', 'small_decay']
  grouped = optim.group_small_arrays(PARAMS, groups)
  assert [x.shape for x in grouped['large']] == [(64, 80)]
  assert grouped['small_decay'].shape == (72,)
  assert grouped['small_no_decay'].shape == (8 + 80,)  # cls_token, then bias
  np.testing.assert_array_equal(grouped['small_no_decay'][:8], 0.5)
  back = optim.ungroup_small_arrays(grouped, groups, PARAMS)
  assert jax.tree.structure(back) == jax.tree.structure(PARAMS)
  for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(PARAMS)):
    np.testing.assert_array_equal(got, want)


def test_grouped_updates_equal_adamw_array_by_array():
  """Three steps with clipping active (gradient norm above 1): the same
  parameters as optax's chain on each array, to float32 rounding (the
  global norm sums in another order)."""
  config = tiny.get_config()
  opt = config.optimizer
  reference = optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(optim.learning_rate(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay, mask=optim.decay_mask))

  def three_steps(tx):
    params, state = PARAMS, tx.init(PARAMS)
    for i in range(3):
      grads = jax.tree.map(lambda p: 3 * jnp.sin((i + 1) * p + 1), params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  got, state = jax.jit(lambda: three_steps(optim.make_optimizer(config)))()
  want, _ = jax.jit(lambda: three_steps(reference))()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
  adam = state[1][0]  # chain: clip, adamw's (scale_by_adam, ...)
  assert adam.mu['small_decay'].shape == (72,)
  assert adam.nu['small_no_decay'].shape == (88,)
