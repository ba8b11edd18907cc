"""STA's attention alone, compiled for one TPU chip per attention_impl.

  python -m benchmarks.sta_blocks --config=configs/k400.py:16 \
      --topology=v5p:2x2x1 --batch_per_chip=8 --config.dtype=bfloat16 \
      [--impls=xla,pallas]

Compiles the forward and backward pass of the attention of every distinct
STA block of the config (the Q/K/V projection, the pooling, equations
(7)-(8), the output projection: ShrinkingTemporalAttention) for one chip
of --topology and --batch_per_chip clips, once per implementation, and
prints what the TPU compiler reads off each program: FLOPs, bytes
accessed and its time estimate (`optimal_seconds`; a Pallas kernel counts
with the pl.CostEstimate it declares). The totals weigh each block by how
many blocks of the model share its shapes: the attention's share of a
train step, which compiles in a fraction of the step's time.
"""

import collections
import json

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from ml_collections import config_flags

from benchmarks import aot
from stat_jax import cli, defaults, model as model_lib
from stat_jax.build import abstract_model
from stat_jax.checks.errors import UserError, report_user_errors

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
config_flags.DEFINE_config_file('config', None, 'Model config.',
                                flag_values=FLAGS)
flags.DEFINE_string('topology', 'v5p:2x2x1',
                    'TPU slice whose chip to compile for.', flag_values=FLAGS)
flags.DEFINE_integer('batch_per_chip', 8, 'Clips per chip.', flag_values=FLAGS)
flags.DEFINE_list('impls', ['xla', 'pallas'],
                  'attention_impl values to compare.', flag_values=FLAGS)
flags.mark_flags_as_required(['config'], flag_values=FLAGS)


def block_inputs(config) -> collections.Counter:
  """{(block index of the first such block, token shape, grid): count} over
  the STA blocks whose attention sees the same shapes and settings."""
  model = abstract_model(config)
  model.eval()
  graphdef, state = nnx.split(model)
  video = jax.ShapeDtypeStruct(
      (FLAGS.batch_per_chip, *defaults.clip_shape(config.data)), jnp.float32)
  inputs = []

  def trace(state, video):
    model = nnx.merge(graphdef, state)
    x, grid = model.tokens(video)
    for block in model.blocks:
      inputs.append((x.shape, grid))
      x, grid = block(x, grid)
    return x

  jax.eval_shape(trace, state, video)
  kinds = collections.Counter()
  first = {}
  for index, (shape, grid) in enumerate(inputs):
    attn = model.blocks[index].attn
    key = (shape, grid, attn.heads, attn.pool_q is not None)
    first.setdefault(key, index)
    kinds[(first[key], shape, grid)] += 1
  return kinds


def compile_attention(config, index: int, shape, grid, device) -> dict:
  """Compiler FLOPs, bytes and time estimate of block `index`'s attention,
  forward and backward, on `device`."""
  model = abstract_model(config)
  attn = model.blocks[index].attn
  graphdef, params = nnx.split(attn)

  def loss(params, x):
    out, _ = nnx.merge(graphdef, params)(x, grid)
    return out.astype(jnp.float32).sum()

  sharding = jax.sharding.SingleDeviceSharding(device)
  x = jax.ShapeDtypeStruct(shape, jnp.dtype(config.dtype), sharding=sharding)
  params = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=sharding),
      params)
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
      params, x).compile()
  cost = compiled.cost_analysis()
  return {key: cost.get(key) for key in
          ('flops', 'bytes accessed', 'optimal_seconds')}


def _compare() -> int:
  if FLAGS.topology == 'cpu':
    raise UserError('--topology=cpu: give a TPU slice (v5p:2x2x1); the '
                    'estimates are the TPU compiler\'s')
  device = aot.slice_devices(FLAGS.topology)[0]
  rows = []
  for impl in FLAGS.impls:
    config = FLAGS.config
    config.model.attention_impl = impl
    model_lib.resolve_for_platform(config, 'tpu')
    for (index, shape, grid), count in sorted(block_inputs(config).items()):
      cost = compile_attention(config, index, shape, grid, device)
      rows.append(dict(impl=impl, block=index, tokens=list(shape), count=count,
                       **cost))
      print(json.dumps(rows[-1]), flush=True)
  for impl in FLAGS.impls:
    mine = [row for row in rows if row['impl'] == impl]
    total = lambda key: sum(row[key] * row['count'] for row in mine)
    print(f'{impl}: attention of all blocks, forward + backward: '
          f'{total("flops") / 1e9:.1f} GFLOP, '
          f'{total("bytes accessed") / 1e9:.2f} GB, '
          f'est {total("optimal_seconds") * 1e3:.2f} ms per chip')
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  cli.no_positional(cli.parse_with_config(FLAGS, argv))
  return report_user_errors('benchmarks.sta_blocks', _compare)


if __name__ == '__main__':
  cli.run_with_config(main)
