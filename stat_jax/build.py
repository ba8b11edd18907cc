"""The network a config builds: STAT (model.py), or MViT-B (mvit.py) with
model.arch = 'mvit'. Apart from model.py because mvit.py builds on its
parts."""

import ml_collections
from flax import nnx

from stat_jax.checks.config import validate_model
from stat_jax.model import STAT
from stat_jax.mvit import MViT


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
  """The STAT (or, with model.arch = 'mvit', the MViT-B) of `config`;
  `model.eval()` for inference. Only what the model reads is validated
  first (config.model, the clip shape, dtype): training fields may be
  absent."""
  validate_model(config)
  if config.model.arch == 'mvit':
    return MViT(config, rngs=rngs)
  return STAT(config, rngs=rngs)


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
  """The model of `config` with shapes only (no memory, no compute)."""
  return nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0)))
