"""Will a config fit on a TPU slice, and how fast would it train there?
Compiled ahead of time on this machine, without the slice.

  python -m benchmarks.aot --config=configs/k400.py:16 --config.dtype=bfloat16 \
      --topology=v5p:4x4x8 --batch_per_chip=8 [--config.mesh.fsdp=4] [--json]
      [--num_slices=2]

Compiles the very train step train.py runs (stat_jax/train_step.py:
jit_train_step: the state laid out by stat_jax/sharding.py over the mesh of
`config.mesh`, the batch split over every chip, the state donated) for the
devices of --topology: `<kind>:<shape>` with kind v4, v5e, v5p or v6e
(e.g. v5p:4x4x8, v5e:16x16, v6e:8x8), or `cpu` for this process's own
devices. A TPU topology needs libtpu: `pip install "jax[tpu]"` at this jax
version, in a separate virtual environment (~700 MB); no TPU is needed.

Reported per chip: the memory XLA plans (arguments, outputs, temporaries)
against the chip's HBM; per step: the TPU compiler's own time estimate
(cost_analysis 'optimal_seconds'), the MFU and clips/s it implies (model
FLOPs of stat_jax.flops), the bytes moved per clip, and each kind of
collective with its bytes and its time at the chip's ICI bandwidth
(bytes / one-direction bandwidth, twice that for an all-reduce: a ring's
cost on a large slice, with no overlap). Beside the estimate: the
program's FLOPs per chip (`program_flops`, XLA's count including what the
Pallas kernels declare) against the model's, the floor its bytes set at
the chip's HBM bandwidth, the kernels of each phase (forward, backward,
optimizer, other: benchmarks/step_kernels.py) with their count, runs, bytes
and roofline time, and each Pallas kernel (`kernels`) with the FLOPs and
bytes it declares. Chip figures: stat_jax/chips.py. A `cpu` topology has
none of them, nor a time estimate: those are null.

--num_slices=S compiles for S such slices joined over the data-center
network (DCN), the mesh laid out by config.mesh.slices = S (data parallel
across the slices). The collectives are then reported in two tables: those
within a slice (ICI) and those between slices (DCN: benchmarks/hlo_cost.py;
no time estimate, as there is no per-chip DCN figure to divide by).
"""

import importlib.util
import json
import os
import re
import time

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from benchmarks import hlo_cost, measure, step_kernels
from stat_jax import chips, cli, model, optim, sharding
from stat_jax.checks.config import validate
from stat_jax.checks.errors import UserError, report_user_errors
from stat_jax.train_state import abstract_train_state, with_shardings
from stat_jax.train_step import abstract_batch, jit_train_step

# kind -> how libtpu lays out its chips: one device per chip, its two
# TensorCores as one (megacore), as v4 and v5p run.
TPU_KINDS = {'v4': 'megacore', 'v5e': 'default', 'v5p': 'megacore',
             'v6e': 'default'}
TOPOLOGY = re.compile(rf'^({"|".join(TPU_KINDS)}):\d+(x\d+)+$')

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
config_flags.DEFINE_config_file('config', None, 'Experiment config.',
                                flag_values=FLAGS)
flags.DEFINE_string('topology', None, "'<kind>:<shape>' (v5p:4x4x8, v5e:16x16) "
                    "or 'cpu' (this process's devices).", flag_values=FLAGS)
flags.DEFINE_integer('batch_per_chip', None, 'Clips per chip per step '
                     '(default: config.batch_size over the chips).',
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('hlo_out', None, 'Also write the optimized HLO here.',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined over DCN '
                     '(a TPU topology; sets config.mesh.slices).',
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'End with the report as one JSON line.',
                  flag_values=FLAGS)
flags.mark_flags_as_required(['config', 'topology'], flag_values=FLAGS)


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def slice_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices to compile for: those of `num_slices` TPU slices (compile
  only), or this process's for 'cpu'."""
  if topology == 'cpu':
    if num_slices > 1:
      raise UserError(f'--num_slices={num_slices} needs a TPU topology '
                      '(e.g. v5p:2x2x1): CPU devices have no slices')
    return jax.devices()
  if not TOPOLOGY.match(topology):
    raise UserError(f'unknown topology {topology!r}: give <kind>:<shape> with '
                    f'kind one of {", ".join(TPU_KINDS)} (e.g. v5p:4x4x8, '
                    'v5e:16x16), or cpu')
  if not libtpu_installed():
    raise UserError(f'--topology={topology} compiles for a TPU slice and needs '
                    f'libtpu: pip install "jax[tpu]=={jax.__version__}" (in a '
                    'separate virtual environment; no TPU needed)')
  kind = topology.split(':')[0]
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # quiets libtpu
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{kind}-8')
  jax.config.update('jax_platforms', 'cpu')  # no TPU here to start
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(
        platform='tpu', topology_name=topology,
        chip_config_name=TPU_KINDS[kind], num_slices=num_slices).devices
  except jax.errors.JaxRuntimeError as error:
    reason = ' '.join(str(error).split())
    raise UserError(f'unknown topology {topology!r} ({reason}): see the slice '
                    f'shapes of cloud.google.com/tpu/docs/{kind}') from error


def compile_train_step(config: ml_collections.ConfigDict,
                       devices: list[jax.Device]):
  """(the train step compiled for `devices`, seconds the compile took, the
  mesh). `config.batch_size` is the global batch."""
  mesh = sharding.make_mesh(config, devices)
  sharding.check_batch(config.batch_size, mesh)
  parts, tx, abstract, shardings = abstract_train_state(config, mesh)
  step = jit_train_step(config, parts, tx, mesh, shardings)
  start = time.perf_counter()
  compiled = step.lower(with_shardings(abstract, shardings),
                        abstract_batch(config)).compile()
  return compiled, time.perf_counter() - start, mesh


def collective_summary(module: hlo_cost.Module,
                       chip: chips.Chip | None) -> tuple[dict, dict]:
  """({kind: {'count', 'bytes', 'seconds'}} of the collectives within a
  slice (ICI), the same of those between slices (DCN)) per step, per chip.
  ICI seconds are None without an ICI figure; DCN seconds always."""
  ici, dcn = ({kind: {'count': 0, 'bytes': 0.0, 'seconds': None}
               for kind in hlo_cost.COLLECTIVES} for _ in range(2))
  for found in hlo_cost.collectives(module):
    summary = dcn if found.over_dcn else ici
    entry = summary.setdefault(found.kind, {'count': 0, 'bytes': 0.0,
                                            'seconds': None})
    entry['count'] += found.count
    entry['bytes'] += found.count * found.bytes
  if chip and chip.ici_bandwidth:
    for kind, entry in ici.items():
      passes = 2 if kind == 'all-reduce' else 1  # reduce-scatter + all-gather
      entry['seconds'] = passes * entry['bytes'] / chip.ici_bandwidth
  return ici, dcn


def slice_report(config: ml_collections.ConfigDict, compiled, compile_s: float,
                 mesh) -> dict:
  """What one train step costs on the slice, from the compiled program."""
  device = mesh.devices.flat[0]
  chip = chips.chip(device)
  n, batch = mesh.size, config.batch_size
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  bytes_per_chip = measure.planned_memory(compiled)
  # The compiler's estimate; it is negative (no estimate) for some programs,
  # and absent off TPUs.
  optimal = cost.get('optimal_seconds')
  step_s = optimal if optimal and optimal > 0 else None
  step_flops = measure.flops_per_clip(config, train=True) * batch
  module = hlo_cost.Module(compiled.as_text())
  collectives, dcn_collectives = collective_summary(module, chip)
  kernels = module.kernels()
  hbm = chip.hbm_bytes if chip else None
  bandwidth = chip.hbm_bandwidth if chip else None
  return {
      'chips': n, 'device_kind': device.device_kind,
      'mesh': dict(mesh.shape), 'batch': batch, 'batch_per_chip': batch // n,
      'dtype': config.dtype, 'remat': config.remat,
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'bytes_per_chip': bytes_per_chip, 'hbm_bytes': hbm,
      'fits': bytes_per_chip <= hbm if hbm else None,
      'compile_s': compile_s, 'optimal_seconds': optimal, 'est_step_s': step_s,
      'est_mfu': (step_flops / (step_s * n * chip.bf16_flops)
                  if step_s and chip else None),
      'est_clips_per_s': batch / step_s if step_s else None,
      'bytes_per_clip': cost['bytes accessed'] * n / batch,
      # The compiled program's FLOPs per chip (XLA's count, with what the
      # Pallas kernels declare), against the model's.
      'program_flops': cost.get('flops'), 'model_flops': step_flops / n,
      'bytes_floor_s': cost['bytes accessed'] / bandwidth if bandwidth else None,
      'phases': step_kernels.phase_summary(
          kernels, chip and chip.bf16_flops, bandwidth),
      'operations': step_kernels.operation_summary(
          kernels, chip and chip.bf16_flops, bandwidth),
      'kernels': step_kernels.pallas_summary(kernels),
      'slices': config.mesh.slices,
      'collectives': collectives, 'dcn_collectives': dcn_collectives,
      'collective_bytes': sum(c['bytes'] for c in [*collectives.values(),
                                                   *dcn_collectives.values()]),
      'recipe_steps': optim.total_steps(config),
      'est_recipe_s': optim.total_steps(config) * step_s if step_s else None,
  }


def _or_na(value, spec: str, scale: float = 1.0) -> str:
  return 'n/a' if value is None else f'{value * scale:{spec}}'


FITS = {True: 'fits', False: 'does NOT fit', None: 'HBM unknown'}


def _memory_line(report: dict) -> str:
  gib = lambda key: f'{report[key] / 2**30:.2f}'
  return (f'memory per chip: {gib("bytes_per_chip")} GiB of '
          f'{_or_na(report["hbm_bytes"], ".1f", 2**-30)} GiB HBM '
          f'({FITS[report["fits"]]}): arguments {gib("argument_bytes")}, '
          f'outputs {gib("output_bytes")}, temporaries {gib("temp_bytes")}, '
          f'donated {gib("alias_bytes")} GiB')


def _estimate_line(report: dict) -> str:
  refused = (f' (it gave {report["optimal_seconds"]:.4g} s)'
             if report['est_step_s'] is None and report['optimal_seconds']
             else '')
  return (f'compiler estimate: {_or_na(report["est_step_s"], ".1f", 1e3)} '
          f'ms/step{refused}, MFU {_or_na(report["est_mfu"], ".1%")}, '
          f'{_or_na(report["est_clips_per_s"], ".0f")} clips/s on the slice; '
          f'{report["bytes_per_clip"] / 1e9:.2f} GB moved per clip')


def _program_lines(report: dict) -> list[str]:
  """The program's FLOPs and bytes floor, its phases, its Pallas kernels,
  the operations that move the most bytes."""
  lines = [f'program: {_or_na(report["program_flops"], ".1f", 1e-9)} GFLOP '
           f'per chip per step (model {report["model_flops"] / 1e9:.1f}); '
           f'its bytes take {_or_na(report["bytes_floor_s"], ".1f", 1e3)} ms '
           'at HBM bandwidth',
           'kernels per step, per chip (roofline time: FLOPs at peak or '
           'bytes at HBM bandwidth, the longer):']
  for name, entry in report['phases'].items():
    lines.append(f'  {name:10s} {entry["kernels"]:6d} kernels, '
                 f'{entry["runs"]:8.0f} runs, {entry["bytes"] / 1e9:8.2f} GB, '
                 f'{_or_na(entry["seconds"], "8.2f", 1e3)} ms')
  for kernel in report['kernels']:
    lines.append(f'  Pallas {kernel["name"]:24s} {kernel["calls"]:4.0f} calls, '
                 f'{kernel["flops"] / 1e9:9.1f} GFLOP, '
                 f'{kernel["bytes"] / 1e9:7.2f} GB declared')
  lines.append('the most bytes, by phase and operation:')
  for entry in report['operations']:
    lines.append(f'  {entry["phase"]:10s} {entry["operation"]:32s} '
                 f'{entry["kernels"]:5d} kernels, '
                 f'{entry["bytes"] / 1e9:8.2f} GB, '
                 f'{_or_na(entry["seconds"], "8.2f", 1e3)} ms')
  return lines


def format_report(report: dict, topology: str) -> str:
  slices = f' x {report["slices"]} slices' if report['slices'] > 1 else ''
  lines = [
      f'{topology}{slices}: {report["chips"]} x {report["device_kind"]}, mesh '
      f'{report["mesh"]}; train step of {report["batch"]} clips '
      f'({report["batch_per_chip"]} per chip), {report["dtype"]}, remat '
      f'{report["remat"]}; compiled in {report["compile_s"]:.0f} s',
      _memory_line(report), _estimate_line(report), *_program_lines(report),
      f'config recipe: {report["recipe_steps"]} steps, '
      f'{_or_na(report["est_recipe_s"], ".1f", 1 / 3600)} h at that rate',
      'collectives per step, per chip'
      + (' within a slice (ICI):' if report['slices'] > 1 else ':'),
      *_collective_lines(report['collectives'], 'ms at ICI bandwidth')]
  if report['slices'] > 1:
    lines += ['collectives across the slices (DCN):',
              *_collective_lines(report['dcn_collectives'],
                                '(no DCN bandwidth figure)')]
  return '\n'.join(lines)


def _collective_lines(collectives: dict, unit: str) -> list[str]:
  return [f'  {kind:18s} {entry["count"]:5d} x, '
          f'{entry["bytes"] / 2**20:10.1f} MiB, '
          f'{_or_na(entry["seconds"], ".2f", 1e3)} {unit}'
          for kind, entry in collectives.items()]


def _report() -> int:
  devices = slice_devices(FLAGS.topology, FLAGS.num_slices)
  config = FLAGS.config
  config.mesh.slices = FLAGS.num_slices
  if FLAGS.batch_per_chip:
    config.batch_size = FLAGS.batch_per_chip * len(devices)
  model.resolve_for_platform(config, devices[0].platform)
  validate(config)
  compiled, compile_s, mesh = compile_train_step(config, devices)
  if FLAGS.hlo_out:  # first: the compile is the long part
    with open(FLAGS.hlo_out, 'w') as f:
      f.write(compiled.as_text())
  report = slice_report(config, compiled, compile_s, mesh)
  print(format_report(report, FLAGS.topology))
  if FLAGS.json:
    print(json.dumps(report))
  return 0


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('benchmarks.aot', _report)


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse_with_config(FLAGS, argv))


if __name__ == '__main__':
  cli.run_with_config(main)
