"""What bounds a config's step on a GPU, read off the compiled program.

  python -m benchmarks.roofline --config=configs/k400.py:16 --train \
      --batch 64 --dtype bfloat16 --target h100 [--top 15] [--json] \
      [--hlo_out step.hlo] [--config.model.conv_impl=xla]

Compiles the forward pass (or the train step with --train) for --target and
reads every kernel's FLOPs and bytes off the optimized HLO
(benchmarks/hlo_cost.py). Each kernel is given its roofline time, the
longer of FLOPs / matmul peak and bytes / memory bandwidth, times its runs
per step (a while loop's body, as `lax.map` compiles, its trip count; a
conditional's branch, as `lax.switch` compiles, its share of the
conditional's runs); their sum is the step's time if every kernel ran at
the roofline and none overlapped (launches and the conditionals' reads of
their branch index cost nothing here). Model FLOPs (stat_jax.flops) over
that time is the highest MFU the program can reach as XLA compiled it: a
bound from the program, not a measurement.

--target h100 / h200 compiles for that GPU without one (deviceless, through
the CUDA plugin: `pip install -e ".[cuda]"` in a separate virtual
environment, ~4 GB; the machine needs no GPU and no driver). XLA's Triton gemm fusions are turned off there: without a GPU to
autotune on, XLA cannot tile some of them ("Couldn't find output tile
sizes"); the gemms go to cuBLAS, so element-wise ops a Triton gemm would
have fused stay separate kernels, and the bound is a little pessimistic.
--target attached compiles for this process's default device; give its
--peak_tflops and --bandwidth_gbs.
"""

import collections
import dataclasses
import json
import os

from absl import app, flags
import jax
import ml_collections

from benchmarks import hlo_cost, measure, step_flags
from benchmarks.hlo_cost import phase
from stat_jax import chips, cli, model
from stat_jax.checks.errors import report_user_errors


@dataclasses.dataclass(frozen=True)
class Gpu:
  """A GPU to compile for: datasheet peaks (dense bf16, HBM) and the
  properties XLA's GPU compiler needs to target it without a device."""
  name: str
  bf16_tflops: float
  bandwidth_gbs: float
  memory_bytes: int
  clock_ghz: float
  cores: int = 132  # streaming multiprocessors
  compute_capability: tuple[int, int] = (9, 0)
  shared_memory_per_core: int = 233472
  l2_bytes: int = 50 * 2**20

  def target_config(self) -> str:
    """A stream_executor.GpuTargetConfigProto in text form."""
    major, minor = self.compute_capability
    return f'''gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: {self.shared_memory_per_core - 1024}
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: 2048 core_count: {self.cores} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth_gbs * 1e9)}
  l2_cache_size: {self.l2_bytes} clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{self.name}"
'''


def datasheet(kind: str) -> dict:
  """The peaks of stat_jax/chips.py for `kind`, in Gpu's units."""
  chip = chips.CHIPS[kind]
  return {'bf16_tflops': chip.bf16_flops / 1e12,
          'bandwidth_gbs': chip.hbm_bandwidth / 1e9,
          'memory_bytes': int(chip.hbm_bytes)}


GPUS = {
    'h100': Gpu('NVIDIA H100 80GB HBM3', **datasheet('H100'), clock_ghz=1.98),
    'h200': Gpu('NVIDIA H200', **datasheet('H200'), clock_ghz=1.98),
}

FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
step_flags.define(FLAGS)
flags.DEFINE_enum('target', 'h100', [*GPUS, 'attached'], 'What to compile for.',
                  flag_values=FLAGS)
flags.DEFINE_float('peak_tflops', None, 'Matmul peak (default: the GPU\'s).',
                   flag_values=FLAGS)
flags.DEFINE_float('bandwidth_gbs', None, 'Memory bandwidth (default: the '
                   'GPU\'s).', flag_values=FLAGS)
flags.DEFINE_integer('top', 15, 'Kernels and groups listed.', flag_values=FLAGS)
flags.DEFINE_string('hlo_out', None, 'Also write the optimized HLO here.',
                    flag_values=FLAGS)
flags.DEFINE_bool('json', False, 'Print one JSON object instead of tables.',
                  flag_values=FLAGS)


def compile_only_device(gpu: Gpu) -> jax.Device:
  """A device of `gpu` to compile for, on a machine without one."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(
        platform='cuda', topology='1x1x1', target_config=gpu.target_config())
  except (RuntimeError, NotImplementedError) as e:
    raise SystemExit(
        f'--target {FLAGS.target} compiles for the GPU without one and needs '
        'JAX\'s CUDA plugin: pip install "jax[cuda13]" (no GPU or driver '
        f'needed). ({type(e).__name__}: {e})') from e
  return topology.devices[0]


def compiled_step(config: ml_collections.ConfigDict, batch: int, train: bool,
                  device: jax.Device | None) -> jax.stages.Compiled:
  """The forward or train program of `config`, compiled for `device`
  (None: the default device) from shapes alone."""
  program = measure.make_program(config, batch=batch, train=train,
                                 device=device, shapes_only=True)
  return program.step.lower(*program.args).compile()


def roofline(kernels: list[hlo_cost.Kernel], *, peak_flops: float,
             bandwidth: float, clips: int, model_flops: float,
             train: bool) -> dict:
  """Roofline seconds of each kernel (times its expected runs, a while
  body's trip count, a conditional branch's share), summed by (kind,
  phase), per clip."""
  groups = collections.defaultdict(collections.Counter)
  timed = []
  for kernel in kernels:
    seconds = kernel.runs * hlo_cost.roofline_seconds(kernel, peak_flops, bandwidth)
    bound = 'flops' if kernel.flops / peak_flops >= kernel.bytes / bandwidth else 'bytes'
    timed.append((seconds, bound, kernel))
    group = groups[f'{kernel.kind} {phase(kernel, train)}']
    group.update(kernels=1, flops=kernel.runs * kernel.flops / clips,
                 bytes=kernel.runs * kernel.bytes / clips, seconds=seconds / clips)
  total = sum(seconds for seconds, _, _ in timed) / clips
  return {
      'kernels': len(kernels),
      'flops_per_clip': sum(k.runs * k.flops for k in kernels) / clips,
      'bytes_per_clip': sum(k.runs * k.bytes for k in kernels) / clips,
      'seconds_per_clip': total,
      'bytes_bound_share': sum(s for s, b, _ in timed if b == 'bytes') / clips / total,
      'mfu_bound': model_flops / total / peak_flops,
      'groups': dict(sorted(groups.items(), key=lambda g: -g[1]['seconds'])),
      'top_kernels': [
          {'name': k.name, 'kind': k.kind, 'phase': phase(k, train), 'bound': bound,
           'ms': 1e3 * seconds, 'runs': k.runs, 'gflop': k.runs * k.flops / 1e9,
           'gb': k.runs * k.bytes / 1e9,
           'shape': k.shape, 'op_name': k.op_name}
          for seconds, bound, k in sorted(timed, key=lambda t: -t[0])],
  }


def format_report(report: dict, top: int) -> str:
  ms, gb = 1e3 * report['seconds_per_clip'], report['bytes_per_clip'] / 1e9
  lines = [
      f'{report["kernels"]} kernels; per clip {report["flops_per_clip"] / 1e9:.1f} '
      f'GFLOP in gemms/convolutions/attention, {gb:.2f} GB moved; roofline time '
      f'{ms:.3f} ms/clip, {report["bytes_bound_share"]:.0%} of it in '
      f'bandwidth-bound kernels; MFU bound {report["mfu_bound"]:.1%}',
      '', f'{"group":24s} {"kernels":>7s} {"GFLOP/clip":>10s} {"GB/clip":>8s} '
      f'{"ms/clip":>8s} {"share":>6s}']
  for name, group in list(report['groups'].items())[:top]:
    lines.append(f'{name:24s} {group["kernels"]:7d} {group["flops"] / 1e9:10.1f} '
                 f'{group["bytes"] / 1e9:8.3f} {1e3 * group["seconds"]:8.3f} '
                 f'{1e3 * group["seconds"] / ms:6.1%}')
  lines += ['', 'largest kernels (ms per step, all their runs):']
  for k in report['top_kernels'][:top]:
    lines.append(f'{k["ms"]:8.3f} {k["bound"]:5s} x{k["runs"]:<5.3g} {k["gflop"]:8.1f} GFLOP '
                 f'{k["gb"]:6.2f} GB  {k["kind"]:11s} {k["phase"]:8s} '
                 f'{k["shape"][:44]:44s} {k["op_name"][-60:]}')
  return '\n'.join(lines)


def _roofline() -> int:
  gpu = GPUS.get(FLAGS.target)
  if gpu is not None:  # compile only: no GPU backend to start
    jax.config.update('jax_platforms', 'cpu')
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_gpu_enable_triton_gemm=false')
  elif FLAGS.peak_tflops is None or FLAGS.bandwidth_gbs is None:
    raise app.UsageError('--target attached needs --peak_tflops and --bandwidth_gbs')
  config = step_flags.config(FLAGS)
  model.resolve_for_platform(config, 'gpu' if gpu else None)
  compiled = compiled_step(config, FLAGS.batch, FLAGS.train,
                           compile_only_device(gpu) if gpu else None)
  hlo = compiled.as_text()
  if FLAGS.hlo_out:
    with open(FLAGS.hlo_out, 'w') as f:
      f.write(hlo)
  report = roofline(
      hlo_cost.Module(hlo).kernels(),
      peak_flops=1e12 * (FLAGS.peak_tflops or gpu.bf16_tflops),
      bandwidth=1e9 * (FLAGS.bandwidth_gbs or gpu.bandwidth_gbs),
      clips=FLAGS.batch, model_flops=measure.flops_per_clip(config, FLAGS.train),
      train=FLAGS.train)
  report['plan_gib'] = measure.planned_memory(compiled) / 2**30
  if FLAGS.json:
    print(json.dumps(report))
    return 0
  print(f'{FLAGS.target}: {"train step" if FLAGS.train else "forward"}, batch '
        f'{FLAGS.batch}, {config.dtype}, conv_impl {config.model.conv_impl}, '
        f'attention_impl {config.model.attention_impl}; XLA plans '
        f'{report["plan_gib"]:.1f} GiB')
  print(format_report(report, FLAGS.top))
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  cli.no_positional(cli.parse_with_config(FLAGS, argv))
  return report_user_errors('benchmarks.roofline', _roofline)


if __name__ == '__main__':
  cli.run_with_config(main)
