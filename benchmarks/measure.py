"""Measuring code shared by speed.py, scaling.py and roofline.py.

For one config: compile the jitted forward pass (the eval step) or the train
step, then report the time per clip (the minimum over repeats: other load on
the machine only ever adds time), the compile time, the memory XLA plans for
one call (on XLA:CPU its plan leaves out most temporaries) and, on Linux,
how far the process's peak resident memory rises above where it was during
one call, the model FLOP/s (2 x the multiply-adds of stat_jax.flops per
clip; a train step counts 3 forward passes) and the MFU against a large
matmul at the same dtype, timed in the same run between the model's runs.
"""

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from stat_jax import defaults, sharding
from stat_jax.flops import model_macs
from stat_jax.model import resolve_dtype
from stat_jax.train_state import (ModelParts, abstract_train_state,
                                  init_train_state)
from stat_jax.train_step import jit_train_step, make_eval_step

MATMUL_SIZE = 4096  # the peak: one [n, n] x [n, n] product at the config dtype


@dataclasses.dataclass
class Program:
  """A jitted step, its arguments and what one call does to them."""
  step: jax.stages.Wrapped | jax.stages.Compiled
  args: tuple
  train: bool  # the step returns (state, metrics) and donates the state
  clips: int  # per call

  def run(self):
    out = jax.block_until_ready(self.step(*self.args))
    if self.train:
      self.args = (out[0], *self.args[1:])


def random_video(config, batch: int) -> jax.Array:
  """uint8 clips [batch, T, S, S, 3], as the input pipeline ships them."""
  shape = (batch, *defaults.clip_shape(config.data))
  return jax.random.randint(jax.random.key(0), shape, 0, 256).astype(jnp.uint8)


def _arguments(make, shapes_only: bool):
  """What `make` returns, computed, or only its shapes and dtypes."""
  return jax.eval_shape(make) if shapes_only else jax.jit(make)()


def one_device_mesh(config: ml_collections.ConfigDict,
                    device: jax.Device | None) -> jax.sharding.Mesh:
  """A (data=1, fsdp=1) mesh of `device` (None: the default device), on
  one slice."""
  config.mesh.data, config.mesh.fsdp, config.mesh.slices = 1, 1, 1
  return sharding.make_mesh(config, [device or jax.devices()[0]])


def forward_program(config, batch: int, device: jax.Device | None = None,
                    shapes_only: bool = False) -> Program:
  """The eval step (forward pass + softmax) on a random clip batch."""
  parts = ModelParts(config)
  on_device = NamedSharding(one_device_mesh(config, device), P())
  args = _arguments(lambda: (parts.init_params(config.seed),
                             random_video(config, batch)), shapes_only)
  return Program(jax.jit(make_eval_step(parts, config.data),
                         in_shardings=on_device),
                 args, train=False, clips=batch)


def train_program(config, batch: int, device: jax.Device | None = None,
                  shapes_only: bool = False) -> Program:
  """The train step as training runs it (augmentation, mixup, forward,
  backward, AdamW; the state donated) on `device`."""
  mesh = one_device_mesh(config, device)
  parts, tx, _, state_shardings = abstract_train_state(config, mesh)
  args = _arguments(lambda: (
      init_train_state(parts, config.seed, tx),
      {'video': random_video(config, batch),
       'key': jax.random.bits(jax.random.key(1), (batch, 2), jnp.uint32),
       'label': jnp.zeros((batch,), jnp.int32)}), shapes_only)
  return Program(jit_train_step(config, parts, tx, mesh, state_shardings),
                 args, train=True, clips=batch)


def make_program(config: ml_collections.ConfigDict, *, batch: int,
                 train: bool, device: jax.Device | None = None,
                 shapes_only: bool = False) -> Program:
  """The forward or train program of `config` at `batch` for `device` (None:
  the default device), not compiled."""
  config = ml_collections.ConfigDict(config)
  config.batch_size = batch
  return (train_program if train else forward_program)(config, batch, device,
                                                        shapes_only)


def compile_program(config: ml_collections.ConfigDict, *, batch: int,
                    train: bool) -> tuple[Program, float]:
  """The forward or train program of `config` at `batch`, compiled ahead of
  time, and the seconds the compile took."""
  program = make_program(config, batch=batch, train=train)
  start = time.perf_counter()
  program.step = program.step.lower(*program.args).compile()
  return program, time.perf_counter() - start


def seconds(call, repeats: int) -> float:
  """The fastest of `repeats` calls (after one untimed call)."""
  call()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - start)
  return best


def matmul_flops_per_s(dtype: str, repeats: int) -> float:
  """FLOP/s of the fastest of `repeats` [n, n] x [n, n] products."""
  a = jax.random.normal(jax.random.key(1), (MATMUL_SIZE, MATMUL_SIZE), dtype)
  product = jax.jit(jnp.dot).lower(a, a).compile()
  return 2 * MATMUL_SIZE**3 / seconds(
      lambda: jax.block_until_ready(product(a, a)), repeats)


def planned_memory(compiled: jax.stages.Compiled) -> int | None:
  """Bytes XLA plans for one call (peak where the backend reports it, else
  arguments + outputs + temporaries - donated aliases), or None."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  peak = getattr(stats, 'peak_memory_in_bytes', 0)
  return peak or (stats.argument_size_in_bytes + stats.output_size_in_bytes
                  + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _status_kib(field: str) -> int:
  status = open('/proc/self/status').read()
  return int(re.search(rf'^{field}:\s+(\d+) kB', status, re.M).group(1))


def peak_rss_growth(call) -> int | None:
  """Bytes the process's peak resident memory rose above its resident
  memory at the start of `call` (Linux: /proc; None elsewhere)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # resets the peak (VmHWM) to the current VmRSS
  except OSError:
    return None
  before = _status_kib('VmRSS')
  call()
  return (_status_kib('VmHWM') - before) * 1024


def flops_per_clip(config: ml_collections.ConfigDict, train: bool) -> float:
  """2 x the multiply-adds of one view; a train step counts as 3 forwards."""
  return 2 * model_macs(config) * (3 if train else 1)


def time_program(program: Program, config: ml_collections.ConfigDict, *,
                 repeats: int) -> dict:
  """Time per clip, FLOP/s and MFU; the matmul peak is timed before and
  after the program, the faster of the two counts."""
  peak = matmul_flops_per_s(config.dtype, repeats)
  best = seconds(program.run, repeats)
  peak = max(peak, matmul_flops_per_s(config.dtype, repeats))
  achieved = flops_per_clip(config, program.train) * program.clips / best
  return {'ms_per_clip': 1e3 * best / program.clips,
          'achieved_gflops': achieved / 1e9, 'peak_gflops': peak / 1e9,
          'mfu': achieved / peak}


def measure(config: ml_collections.ConfigDict, *, batch: int, train: bool,
            repeats: int = 3, label: str = '', run: bool = True
            ) -> tuple[dict, Program]:
  """Compile one program of `config` and, unless `run` is False, time it:
  (a row of the tables, the compiled program)."""
  config = ml_collections.ConfigDict(config)
  config.dtype = resolve_dtype(config.dtype)  # 'auto': this host's backend
  program, compile_s = compile_program(config, batch=batch, train=train)
  memory = planned_memory(program.step)
  growth = peak_rss_growth(program.run) if run else None
  timing = (time_program(program, config, repeats=repeats) if run else
            dict.fromkeys(('ms_per_clip', 'achieved_gflops', 'peak_gflops',
                           'mfu')))
  row = {'label': label, 'frames': config.data.num_frames,
         'mode': 'train' if train else 'forward', 'dtype': config.dtype,
         'batch': batch, **timing,
         'gflop_per_clip': flops_per_clip(config, train) / 1e9,
         'plan_gib': memory / 2**30 if memory is not None else None,
         'rss_growth_gib': growth / 2**30 if growth is not None else None,
         'compile_s': compile_s, 'device': jax.devices()[0].device_kind}
  return row, program


COLUMNS = (  # (heading, key, format spec); text left-aligned, numbers right
    ('config', 'label', '24s'), ('T', 'frames', '3d'), ('mode', 'mode', '7s'),
    ('dtype', 'dtype', '8s'), ('batch', 'batch', '5d'),
    ('ms/clip', 'ms_per_clip', '9.1f'), ('GFLOP/clip', 'gflop_per_clip', '10.1f'),
    ('GFLOP/s', 'achieved_gflops', '8.1f'), ('peak GFLOP/s', 'peak_gflops', '12.1f'),
    ('MFU', 'mfu', '6.1%'), ('plan GiB', 'plan_gib', '8.2f'),
    ('RSS+ GiB', 'rss_growth_gib', '8.2f'), ('compile s', 'compile_s', '9.1f'),
)


def format_table(rows: list[dict]) -> str:
  """A fixed-width table of `measure` rows (n/a where not measured)."""
  def width(spec):
    return int(spec.split('.')[0].rstrip('sdf%'))

  def cell(spec, value):
    if isinstance(value, str):
      return f'{value:<{spec}}'
    return f'{value:>{spec}}' if value is not None else f'{"n/a":>{width(spec)}}'

  head = ' '.join(f'{name:<{width(spec)}}' if spec.endswith('s')
                  else f'{name:>{width(spec)}}' for name, _, spec in COLUMNS)
  return '\n'.join([head] + [' '.join(cell(spec, row[key])
                                      for _, key, spec in COLUMNS)
                             for row in rows])
