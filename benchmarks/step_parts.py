"""One part of the train step compiled alone for a TPU chip, with the
compiler's estimate: the MLP of one STA block (value and gradients, XLA's
or the fused Pallas kernel's), the optimizer update, or mixup / CutMix.

  python -m benchmarks.step_parts --part=mlp --width=192 --tokens=785 \
      [--topology=v5p:2x2x1] [--clips=8] [--json]
  python -m benchmarks.step_parts --part=optimizer --config=configs/k400.py:16
  python -m benchmarks.step_parts --part=mixup --config=configs/k400.py:16 \
      [--clips=8]

Like benchmarks/aot.py it needs libtpu and no TPU. The MLP is that of an
STA block of `width` channels (hidden 4 x width) over `clips` clips of
--frames frames of `tokens` tokens each, in bfloat16 with float32
parameters, with its LayerNorm, drop-path scale and skip; the optimizer
is the config's (clipping, AdamW, applying the updates) on the config's
parameters; mixup is the config's (`config.mixup`: its random draws, the
box and the blend) on --clips float32 clips of the config's shape, each
paired with a clip of another video on the chip. Printed: the compiler's
step estimate, its FLOPs and bytes, and the kernels XLA made.
"""

import json
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import config_flags

from benchmarks import aot, hlo_cost, step_kernels
from stat_jax import defaults, mixup, optim
from stat_jax.kernels import mlp
from stat_jax.train_state import ModelParts

FLAGS = flags.FLAGS
flags.DEFINE_enum('part', 'mlp', ['mlp', 'optimizer', 'mixup'],
                  'What to compile.')
flags.DEFINE_string('topology', 'v5p:2x2x1', 'A slice of aot.py; one chip of it.')
flags.DEFINE_integer('width', 192, 'MLP: channels.')
flags.DEFINE_integer('tokens', 785, 'MLP: tokens per frame.')
flags.DEFINE_integer('frames', 8, 'MLP: frames per clip.')
flags.DEFINE_integer('clips', 8, 'MLP and mixup: clips.')
flags.DEFINE_bool('json', False, 'Print one JSON line per program.')
config_flags.DEFINE_config_file('config', 'configs/k400.py:16',
                                'Optimizer and mixup: the config.')

BF16, F32 = jnp.bfloat16, jnp.float32
EPS = 1e-6


def xla_mlp(x, scale, weights: mlp.MlpWeights):
  """STABlock's XLA path in bfloat16: x + scale * fc2(GELU(fc1(LN(x))))."""
  xf = x.astype(F32)
  mean = xf.mean(-1, keepdims=True)
  var = ((xf - mean) ** 2).mean(-1, keepdims=True)
  xn = ((xf - mean) * jax.lax.rsqrt(var + EPS) * weights.gamma
        + weights.beta).astype(BF16)
  hidden = jax.nn.gelu(xn @ weights.w1 + weights.b1.astype(BF16),
                       approximate=False)
  y = hidden @ weights.w2 + weights.b2.astype(BF16)
  return x + scale[:, None, None, None].astype(BF16) * y


def mlp_programs(chip_sharding):
  """{'xla': ..., 'pallas': ...}: (function, arguments) of the MLP's value
  and gradients."""
  width, hidden = FLAGS.width, 4 * FLAGS.width
  struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                     sharding=chip_sharding)
  x = struct((FLAGS.clips, FLAGS.frames, FLAGS.tokens, width), BF16)
  scale = struct((FLAGS.clips,), F32)
  weights = mlp.MlpWeights(
      struct((width,), F32), struct((width,), F32), struct((width, hidden), BF16),
      struct((hidden,), F32), struct((hidden, width), BF16), struct((width,), F32))
  fused = lambda x, s, w: mlp.fused_mlp_clips(x, s, w, EPS)

  def value_and_grads(block):
    return jax.value_and_grad(lambda x, s, w: (block(x, s, w).astype(F32) ** 2
                                               ).sum(), argnums=(0, 2))
  return {name: (value_and_grads(block), (x, scale, weights))
          for name, block in (('xla', xla_mlp), ('pallas', fused))}


def optimizer_program(chip_sharding):
  """{'optimizer': (update and apply, (params, grads, state))}."""
  config = FLAGS.config
  params = ModelParts(config).abstract_params
  tx = optim.make_optimizer(config)
  place = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=chip_sharding), tree)

  def step(params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return {'optimizer': (step, (place(params), place(params),
                               place(jax.eval_shape(tx.init, params))))}


def mixup_program(chip_sharding):
  """{'mixup': (mix the clips and their targets, (rng, video, labels))}."""
  config = FLAGS.config
  video = jax.ShapeDtypeStruct(
      (FLAGS.clips, *defaults.clip_shape(config.data)), F32,
      sharding=chip_sharding)
  labels = jax.ShapeDtypeStruct((FLAGS.clips,), jnp.int32,
                                sharding=chip_sharding)
  rng = jax.eval_shape(jax.random.key, 0)
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=chip_sharding)

  def mix(rng, video, labels):
    return mixup.mixup_cutmix(rng, video, labels,
                              num_classes=config.model.num_classes,
                              **config.mixup)
  return {'mixup': (mix, (rng, video, labels))}


PROGRAMS = {'mlp': mlp_programs, 'optimizer': optimizer_program,
            'mixup': mixup_program}


def report(name: str, compiled, compile_s: float) -> dict:
  cost = compiled.cost_analysis()
  kernels = hlo_cost.Module(compiled.as_text()).kernels()
  return {'program': name, 'optimal_seconds': cost.get('optimal_seconds'),
          'flops': cost.get('flops'), 'bytes': cost.get('bytes accessed'),
          'kernels': len(kernels),
          'pallas': step_kernels.pallas_summary(kernels),
          'compile_s': compile_s}


def main(argv):
  del argv
  device = aot.slice_devices(FLAGS.topology)[0]
  chip_sharding = NamedSharding(Mesh([device], ('chip',)), PartitionSpec())
  programs = PROGRAMS[FLAGS.part](chip_sharding)
  for name, (fn, args) in programs.items():
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    row = report(name, compiled, time.perf_counter() - start)
    if FLAGS.json:
      print(json.dumps(row))
    else:
      print(f'{name}: estimate {1e6 * row["optimal_seconds"]:.0f} us, '
            f'{row["flops"] / 1e9:.1f} GFLOP, {row["bytes"] / 1e9:.3f} GB, '
            f'{row["kernels"]} kernels; compiled in {row["compile_s"]:.0f} s')
    sys.stdout.flush()


if __name__ == '__main__':
  app.run(main)
