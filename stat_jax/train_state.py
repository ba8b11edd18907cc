"""The train state and the model as pure parts, shared by training
(trainer.py, train_step.py) and deployment (stat_jax/deploy/), which
restores the same state from a checkpoint.

The NNX model is split once into a graph definition and its parameters;
steps merge them back inside `jax.jit`, so everything that crosses the jit
boundary is a plain pytree.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from stat_jax import optim, sharding
from stat_jax.build import abstract_model, build_model


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
    model = abstract_model(config)
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


def init_train_state(parts: ModelParts, seed: int,
                     tx: optax.GradientTransformation) -> TrainState:
  params = parts.init_params(seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params))


def abstract_train_state(config, mesh):
  """(model parts, optimizer, abstract train state, its shardings)."""
  parts = ModelParts(config)
  tx = optim.make_optimizer(config)
  abstract = jax.eval_shape(lambda: init_train_state(parts, config.seed, tx))
  shardings = sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)
  return parts, tx, abstract, shardings


def with_shardings(abstract, shardings):
  """`abstract` (shapes and dtypes) laid out as `shardings`: what a
  checkpoint restores into."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
