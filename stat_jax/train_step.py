"""The train state and the jitted train / eval steps (pure functions).

The NNX model is split once into a graph definition and its parameters; the
steps merge them back inside `jax.jit`, so everything that crosses the jit
boundary is a plain pytree. Randomness depends only on (seed, step): the
dropout / drop-path streams are reseeded from it every step, and so is
mixup, which makes a resumed run replay the same random numbers.
"""

import zlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from stat_jax import mixup
from stat_jax.model import build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done
  params: nnx.State
  opt_state: optax.OptState


def _placeholder(leaf):
  """A concrete stand-in for an RNG variable (reseeded before every use)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key(0)
  return jnp.zeros(leaf.shape, leaf.dtype)


class ModelParts:
  """The model as pure parts, built abstractly (no parameter memory):
  graph definitions for train and eval mode, parameter shapes, RNG state."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    model = nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
    model.train()
    self.train_graph, self.abstract_params, rngs = nnx.split(
        model, nnx.Param, ...)
    model.eval()
    self.eval_graph = nnx.split(model, nnx.Param, ...)[0]
    self._rngs = rngs

  def fresh_rngs(self) -> nnx.State:
    """RNG variables for one trace; the train step reseeds them."""
    return jax.tree.map(_placeholder, self._rngs)

  def init_params(self, seed: int) -> nnx.State:
    """Freshly initialised parameters (call under jit to place them)."""
    return nnx.state(build_model(self.config, nnx.Rngs(seed)), nnx.Param)


def _stream_key(path, key, shape):
  """A distinct dropout key for every module, derived from the step key."""
  del shape
  return jax.random.fold_in(key, zlib.crc32(str(path).encode()) & 0x7FFFFFFF)


def init_train_state(parts: ModelParts, seed: int,
                     tx: optax.GradientTransformation) -> TrainState:
  params = parts.init_params(seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))


def make_train_step(config: ml_collections.ConfigDict, parts: ModelParts,
                    tx: optax.GradientTransformation):
  """train_step(state, batch) -> (state, metrics); batch {'video', 'label'}."""
  num_classes = config.model.num_classes
  accum = config.grad_accum_steps
  base_key = jax.random.key(config.seed)

  def loss_fn(params, video, targets, dropout_key):
    model = nnx.merge(parts.train_graph, params, parts.fresh_rngs())
    nnx.reseed(model, dropout=dropout_key, policy=_stream_key)
    logits = model(video).astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def accumulated_grads(params, video, targets, key):
    """Mean loss and gradients over `accum` micro-batches of the batch."""
    if accum == 1:
      return grad_fn(params, video, targets, key)
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

  def train_step(state: TrainState, batch: dict):
    step_key = jax.random.fold_in(base_key, state.step)
    mixup_key, dropout_key = jax.random.split(step_key)
    video, targets = mixup.mixup_cutmix(
        mixup_key, batch['video'], batch['label'], num_classes=num_classes,
        **config.mixup)
    loss, grads = accumulated_grads(state.params, video, targets, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads)}
    return TrainState(step=state.step + 1, params=params,
                      opt_state=opt_state), metrics

  return train_step


def make_eval_step(parts: ModelParts):
  """eval_step(params, video) -> class probabilities [B, num_classes]."""

  def eval_step(params, video):
    model = nnx.merge(parts.eval_graph, params, parts.fresh_rngs())
    return jax.nn.softmax(model(video).astype(jnp.float32), axis=-1)

  return eval_step
