"""Where the time of one compiled step goes on XLA:CPU, by kind of HLO op.

Runs the program once under jax.profiler and reads the trace back with
jax.profiler.ProfileData: every thunk XLA:CPU runs is an event named after
its HLO instruction; the instruction's `op_name` metadata says which jax
primitive it comes from (a fusion carries its root's; a fusion around a dot
counts as dot_general, with the LayerNorm or softmax XLA fused into it).
Convolutions that XLA:CPU hands to its Eigen thread pool leave no event of
their own: they show as idle gaps in the trace, reported here under the op
that follows.
"""

import collections
import glob
import os
import re
import tempfile

import jax
from jax.profiler import ProfileData

from benchmarks import hlo_cost


def kind_of(op_name: str) -> str:
  """The primitive, or the jitted function the step calls it from:
  'jit(step)/dot_general' -> 'dot_general',
  'jit(step)/jit(depthwise_conv)/jit(_pad)/pad' -> 'depthwise_conv'."""
  scopes = op_name.split('/')
  inner = [s[4:-1] for s in scopes[1:-1] if s.startswith('jit(')]
  return inner[0] if inner else re.sub(r'\[.*', '', scopes[-1])


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> what it computes: a fusion around a dot or a
  convolution (XLA:CPU fuses softmaxes and LayerNorms into them) counts as
  that; anything else as the jax primitive of its op_name (a fusion's root's)."""
  module = hlo_cost.Module(hlo_text)
  kinds = {}
  for body in module.computations.values():
    for instruction in body:
      work, _ = module.work(instruction)
      op_name = instruction.attribute('op_name')
      kinds[instruction.name] = (
          {'gemm': 'dot_general', 'convolution': 'conv_general_dilated'}.get(work)
          or (kind_of(op_name) if op_name else 'other'))
  return kinds


def thunk_events(log_dir: str, kinds: dict[str, str]) -> list:
  """(start_ns, end_ns, instruction) of every traced HLO thunk, by start."""
  path = glob.glob(os.path.join(log_dir, 'plugins/profile/*/*.xplane.pb'))[0]
  events = []
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      events += [(e.start_ns, e.start_ns + e.duration_ns, e.name)
                 for e in line.events if e.name in kinds]
  return sorted(events)


def breakdown(program) -> dict:
  """Time per primitive kind and the largest untraced gaps of one run.

  `program`: a measure.Program whose step is compiled.
  """
  kinds = instruction_kinds(program.step.as_text())
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      program.run()
    events = thunk_events(log_dir, kinds)
  per_kind = collections.Counter()
  gaps = collections.Counter()
  busy_until = events[0][0]
  for start, end, name in events:
    per_kind[kinds[name]] += (end - start) / 1e6
    if start > busy_until:
      gaps[f'gap before {name} ({kinds[name]})'] += (start - busy_until) / 1e6
    busy_until = max(busy_until, end)
  span = (busy_until - events[0][0]) / 1e6
  return {'span_ms': span, 'ms_per_kind': per_kind, 'gaps_ms': gaps}


def format_breakdown(result: dict, top: int = 12) -> str:
  span = result['span_ms']
  lines = [f'traced span {span:.1f} ms (ops may overlap on the threads)']
  for kind, ms in result['ms_per_kind'].most_common(top):
    lines.append(f'  {ms:9.1f} ms {ms / span:6.1%}  {kind}')
  gaps = result['gaps_ms']
  lines.append(f'untraced gaps {sum(gaps.values()):.1f} ms; largest:')
  for where, ms in gaps.most_common(5):
    lines.append(f'  {ms:9.1f} ms {ms / span:6.1%}  {where}')
  return '\n'.join(lines)
