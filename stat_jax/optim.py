"""The MViT / DeiT optimisation recipe: AdamW, linear warmup + cosine decay,
global-norm clipping, no weight decay on biases, norms, position embeddings
and class tokens; the base learning rate is for a batch of 512."""

import math

import jax
import ml_collections
import optax

from stat_jax import param_names

REFERENCE_BATCH = 512
NO_DECAY_NAMES = ('pos_spatial', 'pos_temporal', 'cls_token', 'video_cls')


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


def decay_mask(params):
  """True for the weights that get weight decay: matrices and conv kernels,
  but not position embeddings or class tokens."""
  def decays(path, leaf):
    name = param_names.name_of(path)
    return leaf.ndim >= 2 and not any(n in name for n in NO_DECAY_NAMES)
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opt = config.optimizer
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip),
      optax.adamw(learning_rate(config), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay, mask=decay_mask),
  )
