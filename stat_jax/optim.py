"""The MViT / DeiT optimisation recipe: AdamW, linear warmup + cosine decay,
global-norm clipping, no weight decay on biases, norms, position embeddings
and class tokens; the base learning rate is for a batch of 512.

Most of STAT's parameter arrays are small (biases, norms, pooling kernels:
237 of STAT-16's 308 hold fewer than 4,096 values), and an update per
array is a kernel per array whatever the batch. The optimizer therefore
updates the small ones together, concatenated into one flat vector for
those with weight decay and one for those without; its state holds those
vectors and the large arrays as they are.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from stat_jax import param_names

REFERENCE_BATCH = 512
NO_DECAY_NAMES = ('pos_spatial', 'pos_temporal', 'cls_token', 'video_cls')
SMALL_ARRAY = 4096  # parameter arrays below this size are updated together
SMALL_GROUPS = ('small_decay', 'small_no_decay')


def steps_per_epoch(config: ml_collections.ConfigDict) -> float:
  """Steps that read `train_examples` videos: a step reads batch_size /
  data.repeated_augment of them."""
  videos_per_step = config.batch_size / config.data.repeated_augment
  return config.train_examples / videos_per_step


def total_steps(config: ml_collections.ConfigDict) -> int:
  """`config.total_steps`, or `num_epochs` over `train_examples` videos."""
  if config.total_steps:
    return config.total_steps
  return math.ceil(config.num_epochs * steps_per_epoch(config))


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  opt = config.optimizer
  scale = config.batch_size / REFERENCE_BATCH
  steps = total_steps(config)
  warmup = min(round(opt.warmup_epochs * steps_per_epoch(config)), steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.base_lr * scale, warmup_steps=warmup,
      decay_steps=steps, end_value=opt.min_lr * scale)


def decays(path, leaf) -> bool:
  """Weight decay for matrices and conv kernels, not for position
  embeddings or class tokens."""
  name = param_names.name_of(path)
  return leaf.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)


def decay_mask(params):
  """True for the weights that get weight decay (`decays`)."""
  return jax.tree_util.tree_map_with_path(decays, params)


def _group_names(params) -> list[str]:
  """For each leaf of `params` (in tree order): 'large', or the flat vector
  of SMALL_GROUPS it joins."""
  return ['large' if leaf.size >= SMALL_ARRAY else
          SMALL_GROUPS[0] if decays(path, leaf) else SMALL_GROUPS[1]
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)]


def group_small_arrays(tree, groups: list[str]) -> dict:
  """{'large': [the large leaves], 'small_decay': [n], 'small_no_decay':
  [m]}: the small leaves raveled and concatenated in tree order."""
  leaves = jax.tree.leaves(tree)
  grouped = {'large': [x for x, g in zip(leaves, groups) if g == 'large']}
  for name in SMALL_GROUPS:
    parts = [x.ravel() for x, g in zip(leaves, groups) if g == name]
    grouped[name] = jnp.concatenate(parts) if parts else jnp.zeros((0,))
  return grouped


def ungroup_small_arrays(grouped: dict, groups: list[str], like):
  """The inverse of group_small_arrays, shaped as the tree `like`."""
  leaves, treedef = jax.tree.flatten(like)
  large, offsets, out = iter(grouped['large']), dict.fromkeys(SMALL_GROUPS, 0), []
  for leaf, group in zip(leaves, groups):
    if group == 'large':
      out.append(next(large))
      continue
    start = offsets[group]
    out.append(grouped[group][start:start + leaf.size].reshape(leaf.shape))
    offsets[group] = start + leaf.size
  return treedef.unflatten(out)


def small_arrays_together(make_inner) -> optax.GradientTransformation:
  """The transformation `make_inner(decay mask)` run on the parameters
  grouped by group_small_arrays (the mask is of that grouped tree); its
  updates are ungrouped to the parameters' tree."""
  def inner_and_groups(params):
    groups = _group_names(params)
    large_mask = [decays(path, leaf) for (path, leaf), g in zip(
        jax.tree_util.tree_leaves_with_path(params), groups) if g == 'large']
    mask = {'large': large_mask, SMALL_GROUPS[0]: True,
            SMALL_GROUPS[1]: False}
    return make_inner(mask), groups

  def init(params):
    inner, groups = inner_and_groups(params)
    return inner.init(group_small_arrays(params, groups))

  def update(updates, state, params):
    inner, groups = inner_and_groups(params)
    grouped, state = inner.update(group_small_arrays(updates, groups), state,
                                  group_small_arrays(params, groups))
    return ungroup_small_arrays(grouped, groups, updates), state

  return optax.GradientTransformation(init, update)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  return small_arrays_together(lambda mask: optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(learning_rate(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay, mask=mask),
  ))
