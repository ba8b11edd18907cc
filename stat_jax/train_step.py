"""The jitted train / eval steps (pure functions of the train state and
model parts of stat_jax/train_state.py).

Batches arrive as uint8 clips with per-clip key data; the step augments
them (stat_jax/augment_device.py, randomness from the host's per-clip keys),
then mixes them. The rest of the randomness depends only on (seed, step):
the dropout / drop-path streams are reseeded from it every step, and so is
mixup, which makes a resumed run replay the same random numbers. Mixup
pairs clips of each device's part of the batch (stat_jax/mixup.py), so
which clips meet depends on the number of devices too.

On a mesh of several devices, every device computes the gradients of its
own clips (a vmap over the devices, each with its own dropout key), split
into config.grad_accum_steps micro-batches of its own rows: no clip moves
between devices. Their mean over the devices is the one reduction of the
gradients, in config.grad_reduce_dtype.
"""

import zlib

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stat_jax import augment_device, defaults, mixup, sharding
from stat_jax.train_state import ModelParts, TrainState


def _stream_key(path, key, shape):
  """A distinct dropout key for every module, derived from the step key."""
  del shape
  return jax.random.fold_in(key, zlib.crc32(str(path).encode()) & 0x7FFFFFFF)


def per_device(fn, mesh: Mesh | None, shared: int = 0):
  """fn(*clip_args, *shared_args) -> clips (or a tuple of them), run by
  every device of `mesh` on its own part of the batch (the whole batch
  without a mesh); the last `shared` arguments are the same everywhere.
  Not checked for values that vary over the devices: fn's switches mix
  constant branches (an identity warp) with per-clip ones, and it reads
  nothing but its clips."""
  if mesh is None:
    return fn
  clips = P(sharding.BATCH_AXES)

  def on_each_device(*args):
    specs = (clips,) * (len(args) - shared) + (P(),) * shared
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=clips,
                         check_vma=False)(*args)

  return on_each_device


def mixup_partner(config: ml_collections.ConfigDict, mesh: Mesh | None):
  """mixup.partner_fn for this batch split over `mesh`'s devices."""
  devices = mesh.size if mesh is not None else 1
  return mixup.partner_fn(config.batch_size // devices,
                          config.data.repeated_augment, devices,
                          sharding.BATCH_AXES)


def make_train_step(config: ml_collections.ConfigDict, parts: ModelParts,
                    tx: optax.GradientTransformation, mesh: Mesh | None = None):
  """train_step(state, batch) -> (state, metrics); batch {'video' uint8
  [B, T, S, S, 3], 'key' uint32 [B, 2], 'label' int32 [B]}, split over the
  devices of `mesh` (each augments, mixes and differentiates its own clips)
  or over none."""
  num_classes = config.model.num_classes
  partner = mixup_partner(config, mesh) if mixup.mixes(config.mixup) else None

  def augment_and_mix(video, key, labels, rng):
    video = augment_device.augment_batch(video, key, config.data)
    return mixup.mixup_cutmix(rng, video, labels, num_classes=num_classes,
                              partner=partner, **config.mixup)

  prepare = per_device(augment_and_mix, mesh, shared=1)  # rng: shared
  batch_grads = make_batch_grads(config, parts, mesh)
  base_key = jax.random.key(config.seed)

  def train_step(state: TrainState, batch: dict):
    step_key = jax.random.fold_in(base_key, state.step)
    mixup_key, dropout_key = jax.random.split(step_key)
    video, targets = prepare(batch['video'], batch['key'], batch['label'],
                             mixup_key)
    loss, grads = batch_grads(state.params, video, targets, dropout_key)
    with jax.named_scope('optimizer'):  # benchmarks/hlo_cost.py's phases
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state), metrics

  return train_step


def make_batch_grads(config: ml_collections.ConfigDict, parts: ModelParts,
                     mesh: Mesh | None):
  """batch_grads(params, video, targets, key) -> (mean loss, gradients)
  of a batch split over `mesh` (module doc)."""
  accum = config.grad_accum_steps
  devices = mesh.size if mesh is not None else 1
  reduce_dtype = jnp.dtype(config.grad_reduce_dtype)

  def loss_fn(params, video, targets, dropout_key):
    model = nnx.merge(parts.train_graph, params, parts.fresh_rngs())
    nnx.reseed(model, dropout=dropout_key, policy=_stream_key)
    logits = model(video).astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def device_grads(params, video, targets, key):
    """Mean loss and gradients of one device's clips [b, ...], over
    `accum` micro-batches of them."""
    if accum == 1:
      return grad_fn(params, video, targets, key)
    # [accum, b / accum, ...]: micro-batch i is rows i b / accum, ...
    split = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

    def micro_step(carry, xs):
      index, micro_video, micro_targets = xs
      loss, grads = grad_fn(params, micro_video, micro_targets,
                            jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    total, _ = jax.lax.scan(
        micro_step, zeros, (jnp.arange(accum), split(video), split(targets)))
    return jax.tree.map(lambda x: x / accum, total)

  if devices == 1:
    return device_grads
  by_device = NamedSharding(mesh, P(sharding.BATCH_AXES))

  def rows(x):  # [B, ...] -> [devices, b, ...], dim 0 split as the batch is
    return jax.lax.with_sharding_constraint(
        x.reshape(devices, x.shape[0] // devices, *x.shape[1:]), by_device)

  def mean_over_devices(grads):  # [devices, ...] -> [...], the all-reduce
    # lax.reduce, not jnp.sum / mean: those may widen bfloat16 first.
    summed = jax.lax.reduce(grads.astype(reduce_dtype),
                            jnp.zeros((), reduce_dtype), jax.lax.add, (0,))
    return summed.astype(grads.dtype) / devices

  def batch_grads(params, video, targets, key):
    losses, grads = jax.vmap(device_grads, in_axes=(None, 0, 0, 0))(
        params, rows(video), rows(targets), jax.random.split(key, devices))
    return losses.mean(), jax.tree.map(mean_over_devices, grads)

  return batch_grads


def jit_train_step(config: ml_collections.ConfigDict, parts: ModelParts,
                   tx: optax.GradientTransformation, mesh: Mesh,
                   state_shardings) -> jax.stages.Wrapped:
  """The train step as training runs it: the state laid out as
  `state_shardings` and donated (updated in place), the batch split over
  every device of `mesh`."""
  batch = sharding.batch_sharding(mesh)
  return jax.jit(make_train_step(config, parts, tx, mesh),
                 in_shardings=(state_shardings,
                               {key: batch for key in abstract_batch(config)}),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def abstract_batch(config: ml_collections.ConfigDict) -> dict:
  """Shapes and dtypes of one global batch of `config.batch_size` clips:
  uint8 clips, augmented in the step, with their key data."""
  size = config.batch_size
  return {
      'video': jax.ShapeDtypeStruct(
          (size, *defaults.clip_shape(config.data)), jnp.uint8),
      'key': jax.ShapeDtypeStruct((size, 2), jnp.uint32),
      'label': jax.ShapeDtypeStruct((size,), jnp.int32)}


def make_eval_step(parts: ModelParts, data: ml_collections.ConfigDict):
  """eval_step(params, video uint8 [B, T, S, S, 3]) -> class probabilities
  [B, num_classes]."""

  def eval_step(params, video):
    model = nnx.merge(parts.eval_graph, params, parts.fresh_rngs())
    logits = model(augment_device.normalise(video, data))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return eval_step
