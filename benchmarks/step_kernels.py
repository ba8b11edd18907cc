"""A train step's kernels (benchmarks/hlo_cost.py) grouped: by phase
(forward, backward, optimizer, copies, other), by what they compute
(operation: the jax operation at a kernel's root; category: matmul,
convolution, Pallas, layout, reduction, element-wise, prefetch), and each
Pallas kernel with what it declares. benchmarks/aot.py reports them; on
an HLO it wrote with --hlo_out:

  python -m benchmarks.step_kernels step.hlo [--chip='TPU v5'] [--top=20]
"""

import re

from absl import app, flags

from benchmarks import hlo_cost
from stat_jax import chips

FLAGS = flags.FLAGS

# The jax primitives that only move data into another layout or shape.
LAYOUT = frozenset((
    'copy', 'transpose', 'reshape', 'squeeze', 'expand_dims', 'slice',
    'dynamic_slice', 'dynamic_update_slice', 'split', 'concatenate', 'pad',
    'broadcast_in_dim', 'gather', 'scatter', 'rev', 'dot_general',
    'conv_general_dilated'))
REDUCTIONS = frozenset((
    'reduce_sum', 'reduce_max', 'reduce_min', 'reduce', 'argmax',
    'reduce_window_sum', 'reduce_window_max', 'select_and_scatter_add',
    'select_and_scatter', 'cumsum'))


def operation(kernel: hlo_cost.Kernel) -> str:
  """What a kernel computes, from the jax operation at its root: 'matmul'
  (a dot, whether XLA made it a gemm or a convolution), 'convolution' (a
  lax convolution: the stem, the pooling), 'pallas <name>', 'prefetch'
  (an asynchronous copy) or the jax primitive (copy, transpose,
  reduce_sum, convert_element_type, ...)."""
  if kernel.opcode == 'copy-start':
    return 'prefetch'
  if kernel.kind == 'pallas':
    return f'pallas {kernel.name}'
  primitive = (re.sub(r'\(.*', '', kernel.op_name.rsplit('/', 1)[-1])
               or kernel.opcode)
  if kernel.kind in ('gemm', 'convolution'):
    return 'matmul' if primitive == 'dot_general' else 'convolution'
  return primitive


def summary(kernels: list[hlo_cost.Kernel], key, peak_flops: float | None,
            bandwidth: float | None) -> dict:
  """{key(kernel): {'kernels', 'runs', 'flops', 'bytes', 'seconds'}}:
  kernels counted once, runs as expected per step, FLOPs, bytes and
  roofline seconds summed over the runs (None without the chip's peaks)."""
  groups = {}
  for kernel in kernels:
    entry = groups.setdefault(key(kernel), dict.fromkeys(
        ('kernels', 'runs', 'flops', 'bytes', 'seconds'), 0))
    entry['kernels'] += 1
    entry['runs'] += kernel.runs
    entry['flops'] += kernel.runs * kernel.flops
    entry['bytes'] += kernel.runs * kernel.bytes
    if peak_flops and bandwidth:
      entry['seconds'] += kernel.runs * hlo_cost.roofline_seconds(
          kernel, peak_flops, bandwidth)
    else:
      entry['seconds'] = None
  return groups


def phase_summary(kernels: list[hlo_cost.Kernel], peak_flops: float | None,
                  bandwidth: float | None) -> dict:
  """summary of a train step's kernels by phase."""
  return summary(kernels, lambda kernel: hlo_cost.phase(kernel, train=True),
                 peak_flops, bandwidth)


def operation_summary(kernels: list[hlo_cost.Kernel], peak_flops: float | None,
                      bandwidth: float | None, top: int = 12) -> list[dict]:
  """The `top` (phase, operation) groups of a train step's kernels by
  bytes, each {'phase', 'operation'} and summary's counts."""
  groups = summary(kernels, lambda kernel: (hlo_cost.phase(kernel, train=True),
                                            operation(kernel)),
                   peak_flops, bandwidth)
  ranked = sorted(groups.items(), key=lambda item: -item[1]['bytes'])
  return [{'phase': key[0], 'operation': key[1], **entry}
          for key, entry in ranked[:top]]


def pallas_summary(kernels: list[hlo_cost.Kernel]) -> list[dict]:
  """Each Pallas kernel by name: its calls per step and the FLOPs and
  bytes it declares for them together."""
  groups = summary([kernel for kernel in kernels if kernel.kind == 'pallas'],
                   lambda kernel: kernel.name, None, None)
  return [{'name': name, 'calls': entry['runs'], 'flops': entry['flops'],
           'bytes': entry['bytes']} for name, entry in groups.items()]


def category(kernel: hlo_cost.Kernel) -> str:
  """'matmul', 'convolution', 'attention' (cuDNN's), 'pallas', 'prefetch',
  'layout' (a fusion rooted in an operation that moves data: slices,
  reshapes, transposes, copies, and the layout changes around a dot or
  convolution that hold none), 'reduction' (norms, softmax sums, bias
  gradients, pooling windows) or 'element-wise' (the rest)."""
  if kernel.kind == 'attention':  # a cuDNN fused attention
    return 'attention'
  name = operation(kernel)
  if name in ('matmul', 'convolution', 'prefetch'):
    return name
  if name.startswith('pallas '):
    return 'pallas'
  if name in LAYOUT:
    return 'layout'
  return 'reduction' if name in REDUCTIONS else 'element-wise'


def category_summary(kernels: list[hlo_cost.Kernel], peak_flops: float | None,
                     bandwidth: float | None) -> dict:
  """summary of a train step's kernels by (phase, category)."""
  return summary(kernels, lambda kernel: (hlo_cost.phase(kernel, train=True),
                                          category(kernel)),
                 peak_flops, bandwidth)


def _line(name: str, entry: dict) -> str:
  return (f'  {name:44s} {entry["kernels"]:5d} kernels, '
          f'{entry["bytes"] / 1e9:8.2f} GB, {entry["flops"] / 1e9:8.1f} GFLOP, '
          f'{entry["seconds"] * 1e3:8.2f} ms')


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('one argument: the optimized HLO text of a step')
  with open(argv[1]) as f:
    kernels = hlo_cost.Module(f.read()).kernels()
  chip = chips.CHIPS[FLAGS.chip]
  peaks = chip.bf16_flops, chip.hbm_bandwidth
  print(f'{len(kernels)} kernels; roofline time at {FLAGS.chip}: FLOPs at '
        'peak or bytes at HBM bandwidth, the longer')
  print('by phase:')
  for name, entry in phase_summary(kernels, *peaks).items():
    print(_line(name, entry))
  print('by phase and category:')
  groups = category_summary(kernels, *peaks)
  for (phase, kind), entry in sorted(groups.items(),
                                     key=lambda item: -item[1]['bytes']):
    print(_line(f'{phase} {kind}', entry))
  print('by phase and operation, the most bytes:')
  for entry in operation_summary(kernels, *peaks, top=FLAGS.top):
    print(_line(f'{entry["phase"]} {entry["operation"]}', entry))


if __name__ == '__main__':
  # Defined here: aot.py and step_parts.py import this module.
  flags.DEFINE_string('chip', 'TPU v5', 'The chip whose peaks time the '
                      "kernels: a name of stat_jax/chips.py's CHIPS.")
  flags.DEFINE_integer('top', 20, 'Operations listed, by bytes.')
  app.run(main)
