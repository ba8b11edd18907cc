"""Multiply-adds of one view: the paper's "GFLOPs" (fvcore / MViT convention).

Counts the MACs of every `dot_general` and `conv_general_dilated` in the
jaxpr of one forward pass at batch 1, walking nested jaxprs (jit, vmap,
custom_jvp, remat, scan x its length); conv.depthwise_conv, which computes
a convolution as shifted multiply-adds, counts as that convolution. XLA's
`cost_analysis()` flops / 2 is printed beside it as a cross-check (XLA also
counts element-wise ops).

  python -m stat_jax.flops --config=configs/k400.py:16
"""

import math

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from stat_jax import cli, conv, defaults
from stat_jax.checks.errors import report_user_errors
from stat_jax.build import abstract_model


def dot_general_macs(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (lhs_contract, _), (lhs_batch, rhs_batch) = eqn.params['dimension_numbers']
  out = eqn.outvars[0].aval.shape
  return math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  rhs_out_dim = eqn.params['dimension_numbers'].rhs_spec[0]
  # Each output element sums over the kernel window and its input group.
  return math.prod(out) * math.prod(rhs) // rhs[rhs_out_dim]


def depthwise_conv_macs(eqn) -> int:
  """conv.depthwise_conv: one multiply-add per output and window tap."""
  kernel = eqn.invars[1].aval.shape  # [*window, 1, C]
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel[:-2])


def _sub_jaxprs(value):
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _sub_jaxprs(item)


def count_jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'jit' and eqn.params['name'] == conv.depthwise_conv.__name__:
      total += depthwise_conv_macs(eqn)
      continue
    if name == 'dot_general':
      total += dot_general_macs(eqn)
    elif name == 'conv_general_dilated':
      total += conv_macs(eqn)
    repeat = eqn.params.get('length', 1) if name == 'scan' else 1
    subs = [count_jaxpr_macs(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if name == 'cond':  # one branch runs: count the dearest
      total += max(subs, default=0)
    else:
      total += repeat * sum(subs)
  return total


def count_macs(fn, *args) -> int:
  """Multiply-adds of `fn(*args)` counted from its jaxpr."""
  return count_jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def xla_flops(fn, *args) -> float:
  """XLA's own flop estimate of the compiled `fn(*args)`."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returns one per device
    analysis = analysis[0]
  return float(analysis['flops'])


def model_forward(model: nnx.Module, config):
  """(forward function of the model state, that state, one view at batch 1)."""
  graphdef, state = nnx.split(model)
  view = jax.ShapeDtypeStruct((1, *defaults.clip_shape(config.data)),
                              jnp.float32)

  def forward(state, video):
    model = nnx.merge(graphdef, state)
    model.eval()
    return model(video)

  return forward, state, view


def param_count(model: nnx.Module) -> int:
  """Number of trainable parameters (RNG state and the like excluded)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _counted(config):
  """A copy of `config` with the attention and the MLP on XLA: a Pallas
  kernel's jaxpr is one grid step of it, so the kernel's form would hide
  most of its multiply-adds (every implementation computes the same)."""
  counted = config.copy_and_resolve_references()
  counted.model.attention_impl = 'xla'
  counted.model.mlp_impl = 'xla'
  return counted


def model_macs(config) -> int:
  """Multiply-adds of one view of the configured model."""
  return model_cost(config)[0]


def model_cost(config) -> tuple[int, int]:
  """(multiply-adds of one view, trainable parameters), one abstract build."""
  config = _counted(config)
  model = abstract_model(config)
  return count_macs(*model_forward(model, config)), param_count(model)


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
config_flags.DEFINE_config_file('config', None, 'Experiment config.',
                                flag_values=FLAGS)
flags.mark_flags_as_required(['config'], flag_values=FLAGS)


def _report() -> int:
  config = _counted(FLAGS.config)
  model = abstract_model(config)
  forward, state, view = model_forward(model, config)
  macs = count_macs(forward, state, view)
  print(f'params          {param_count(model) / 1e6:8.3f} M')
  print(f'GMACs per view  {macs / 1e9:8.3f}   (jaxpr count: dot_general + conv)')
  concrete = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state)
  xla = xla_flops(forward, concrete, jnp.zeros(view.shape, view.dtype))
  print(f'XLA flops / 2   {xla / 2e9:8.3f}   (cost_analysis, incl. element-wise)')
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  cli.no_positional(cli.parse_with_config(FLAGS, argv))
  return report_user_errors('stat_jax.flops', _report)


if __name__ == '__main__':
  cli.run_with_config(main)
