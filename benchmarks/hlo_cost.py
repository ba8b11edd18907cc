"""FLOPs and bytes of every kernel of a compiled XLA program, read from its
optimized HLO text.

A kernel is one instruction of the entry computation, of a while loop's
body or condition or of a conditional's branches that does work: a fusion,
a library call (cuBLAS gemm, cuDNN convolution or flash attention), a copy.
It runs `runs` times per call of the program: a while loop's body as many
times as the trip count XLA proved (its `known_trip_count`; once when XLA
proved none), its condition once more; a conditional's branch 1 / (number
of branches) of the times the conditional runs. That is the average
branch, not the costliest: a conditional runs one branch, and the
program does not say which; the average is the expected cost when the
index is drawn uniformly, as RandAugment draws its ops (the costliest
branch would bound a worst case, not the step's time). Its bytes are what
it reads and writes in device memory per run: the operands it reads (a
fusion parameter that feeds only slices counts as those slices; the buffer
a dynamic-update-slice updates in place is neither read nor written
whole, only the update is written) and its outputs (a library call's
scratch workspace not counted). Its FLOPs are those of the dots,
convolutions and fused attentions it contains (a cuDNN gradient counts the
forward convolution's FLOPs, as cuDNN computes it); element-wise arithmetic
is not counted (it never bounds a kernel next to the bytes it moves). A
Pallas TPU kernel (a `tpu_custom_call`) is opaque to XLA: its FLOPs and
bytes are the pl.CostEstimate it declares, which counts what its grid
really moves (every block re-read, tiles padded) rather than its operands
once.
Layout-only instructions (bitcast, tuple, get-tuple-element, parameter,
constant) are free. An asynchronous copy (copy-start; its copy-done only
waits) reads its operand and writes it once, not at all where it writes
to the TPU's on-chip memory (a prefetch: layout `S(1)`); the kernel that
then reads the copy is counted as reading memory, so prefetched bytes
count twice.

Collectives (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute) are listed apart, with their bytes and how many times a
call runs them (benchmarks/aot.py). A multi-slice TPU program is one
slice's program: its collectives between slices, over the data-center
network (DCN), are sends to the megascale runtime naming the collective
they are part of; they are listed as collectives too, marked over_dcn.
"""

import dataclasses
import json
import math
import re

BYTES_PER_ELEMENT = {
    'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 'f8e4m3fn': 1,
    'f8e5m2': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
    'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
}
ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([\d,]*)\]')
INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$')
COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%([^\s(]+)\s*\(')
# An asynchronous copy's -done half only waits: its -start moves the data.
FREE = {'parameter', 'constant', 'bitcast', 'tuple', 'get-tuple-element',
        'while', 'conditional', 'after-all', 'partition-id', 'replica-id',
        'copy-done'}
# The layout of an array in the TPU's on-chip memory (VMEM): `{...S(1)}`.
ON_CHIP = re.compile(r'^\(\w+\[[\d,]*\]\{[^}]*S\(1\)\}')
SLICES = {'slice', 'dynamic-slice'}
# Library calls whose last output, if bytes, is a scratch buffer, not a result.
WORKSPACE_TARGETS = ('__cublas', '__cudnn')
PALLAS_TPU_TARGET = 'tpu_custom_call'


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # 'bf16[8,196,96]{2,1,0}' or a tuple '(f32[4], s8[64])'
  opcode: str
  arguments: str  # the text between the opcode's parentheses
  attributes: str  # everything after them
  is_root: bool = False  # its computation's ROOT

  @property
  def operands(self) -> list[str]:
    return re.findall(r'%([^\s,)]+)', self.arguments)

  def branches(self) -> list[str]:
    """The branch computations of a conditional, in index order (a
    predicated one: true, then false)."""
    listed = self.attribute('branch_computations')
    if listed is not None:
      return [b.strip().lstrip('%') for b in listed.strip('{}').split(',')]
    return [self.attribute('true_computation'),
            self.attribute('false_computation')]

  def attribute(self, key: str) -> str | None:
    found = re.search(rf'\b{key}=("[^"]*"|{{[^}}]*}}|%?[\w.\-$]+)',
                      self.attributes)
    return found.group(1).strip('"').lstrip('%') if found else None


@dataclasses.dataclass
class Kernel:
  name: str
  opcode: str  # 'fusion', 'custom-call', 'copy', ...
  kind: str  # 'gemm', 'convolution', 'attention', or the opcode ('fusion', ...)
  flops: float
  bytes: float
  op_name: str  # the jax source path of its root, from the HLO metadata
  shape: str
  # Expected runs per call of the program (while trip counts, conditional
  # branches' shares); flops and bytes are per run.
  runs: float = 1.0


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """(element type, dims) of every array in a (possibly tuple) shape."""
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in ARRAY.findall(shape) if dtype in BYTES_PER_ELEMENT]


def arrays_bytes(arrays: list[tuple[str, tuple[int, ...]]]) -> float:
  return sum(BYTES_PER_ELEMENT[dtype] * math.prod(dims) for dtype, dims in arrays)


def shape_bytes(shape: str) -> float:
  return arrays_bytes(array_shapes(shape))


def _closing_paren(text: str, start: int) -> int:
  """The index of the ')' that closes the '(' at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f'unbalanced parentheses in HLO: {text[:80]}')


def parse_instruction(line: str) -> Instruction | None:
  """'%name = shape opcode(arguments), attributes' -> an Instruction; the
  shape may be a tuple '(f32[2], s8[4])'."""
  match = INSTRUCTION.match(line)
  if not match:
    return None
  text = match.group(2)
  if text.startswith('('):
    shape_end = _closing_paren(text, 0) + 1
  else:
    shape_end = text.index(' ')
  shape, rest = text[:shape_end], text[shape_end:].lstrip()
  opened = rest.index('(')
  closed = _closing_paren(rest, opened)
  return Instruction(match.group(1), shape, rest[:opened],
                     rest[opened + 1:closed], rest[closed + 1:],
                     line.lstrip().startswith('ROOT'))


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation name: its instructions}, the entry computation's name)."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      if line.startswith('ENTRY'):
        entry = header.group(1)
    elif line.startswith('}'):
      current = None
    elif current is not None:
      instruction = parse_instruction(line)
      if instruction:
        current.append(instruction)
  if entry is None:
    raise ValueError('no ENTRY computation in the HLO text')
  return computations, entry


def dot_flops(dot: Instruction, shapes: dict[str, str]) -> float:
  """2 x output elements x contracted size, from a dot or a gemm call."""
  contracting = dot.attribute('lhs_contracting_dims')
  if contracting is not None:
    dims = [int(d) for d in contracting.strip('{}').split(',') if d]
  else:  # a library gemm: the dimension numbers are in its backend config
    numbers = backend_config(dot)['gemm_backend_config']['dot_dimension_numbers']
    dims = [int(d) for d in numbers['lhs_contracting_dimensions']]
  lhs = array_shapes(shapes[dot.operands[0]])[0][1]
  out = array_shapes(dot.shape)[0][1]
  return 2 * math.prod(out) * math.prod(lhs[d] for d in dims)


def convolution_flops(conv: Instruction, shapes: dict[str, str]) -> float:
  """2 x output elements x (kernel elements / output features) of the forward
  convolution: a cuDNN gradient call describes the forward it belongs to
  (its output gradient and kernel are operands 0 and 1 for the input
  gradient, its input and output gradient for the kernel gradient). An
  XLA convolution counts the taps _share_of_taps_counted says."""
  kernel_labels = conv.attribute('dim_labels').split('_')[1].split('->')[0]
  target = conv.attribute('custom_call_target') or ''
  result = conv.shape
  out, kernel = {
      '__cudnn$convBackwardInput': (shapes[conv.operands[0]],
                                    shapes[conv.operands[1]]),
      '__cudnn$convBackwardFilter': (shapes[conv.operands[1]], result),
  }.get(target, (result, shapes[conv.operands[1]]))
  out, kernel = array_shapes(out)[0][1], array_shapes(kernel)[0][1]
  features = kernel[kernel_labels.index('o')]
  taps = math.prod(kernel) / features
  if not target:  # an XLA convolution: its input is operand 0
    taps *= _share_of_taps_counted(conv, shapes)
  return 2 * math.prod(out) * taps


def _window(conv: Instruction) -> dict[str, list]:
  """The window attribute per spatial dimension: size, stride, pad (low,
  high), lhs_dilate, rhs_dilate (defaults where not printed)."""
  text = conv.attribute('window') or ''
  found = {key: re.search(rf'\b{key}=([\d_x-]+)', text)
           for key in ('size', 'stride', 'pad', 'lhs_dilate', 'rhs_dilate')}
  sizes = [int(n) for n in found['size'].group(1).split('x')]
  parse = lambda key, default: ([default] * len(sizes) if not found[key] else
                                found[key].group(1).split('x'))
  return {'size': sizes,
          'stride': [int(n) for n in parse('stride', 1)],
          'pad': [tuple(int(n) for n in p.split('_')) if isinstance(p, str)
                  else (0, 0) for p in parse('pad', None)],
          'lhs_dilate': [int(n) for n in parse('lhs_dilate', 1)],
          'rhs_dilate': [int(n) for n in parse('rhs_dilate', 1)]}


def _taps_meeting_input(size, window, stride, pad_low, lhs_dilate,
                        rhs_dilate, outputs) -> int:
  """(output, tap) pairs of one spatial dimension whose tap lands on an
  input element (not on padding, nor between dilated elements)."""
  last = (size - 1) * lhs_dilate
  return sum(1 for o in range(outputs) for w in range(window)
             if 0 <= (p := o * stride + w * rhs_dilate - pad_low) <= last
             and p % lhs_dilate == 0)


def _share_of_taps_counted(conv: Instruction, shapes: dict[str, str]) -> float:
  """Of an XLA convolution's output x window taps, the share its FLOPs
  count, per spatial dimension: all of them where the input is not
  dilated and is padded by at most half a window (a convolution: its
  padded taps count, as the model's FLOP counter counts them); else the
  taps that meet the input (XLA writes a dot's batch dimension as a
  spatial one padded or dilated by a whole window, and gradients as
  convolutions of dilated inputs)."""
  if not conv.attribute('window'):
    return 1.0
  window = _window(conv)
  labels = re.search(r'\bdim_labels=(\w+)_\w+->(\w+)', conv.attributes)
  lhs_labels, out_labels = labels.groups()
  lhs = array_shapes(shapes[conv.operands[0]])[0][1]
  out = array_shapes(conv.shape)[0][1]
  share = 1.0
  for label, size in zip(lhs_labels, lhs):
    if not label.isdigit():
      continue
    d = int(label)
    taps, (low, high) = window['size'][d], window['pad'][d]
    if window['lhs_dilate'][d] == 1 and max(low, high) <= taps // 2:
      continue
    outputs = out[out_labels.index(label)]
    share *= _taps_meeting_input(
        size, taps, window['stride'][d], low, window['lhs_dilate'][d],
        window['rhs_dilate'][d], outputs) / (outputs * taps)
  return share


def backend_config(instruction: Instruction) -> dict:
  """The JSON backend config of an instruction, printed bare or as a
  quoted string."""
  text = instruction.attributes.partition('backend_config=')[2]
  if text.startswith('"'):
    text, _ = json.JSONDecoder().raw_decode(text)
  config, _ = json.JSONDecoder().raw_decode(text)
  return config


def declared_cost(instruction: Instruction) -> dict[str, float] | None:
  """The cost estimate a Pallas TPU kernel declares ({'flops',
  'bytes_accessed', 'transcendentals', ...}; the HLO prints the numbers as
  strings), or None where it declares none or the instruction is no Pallas
  kernel."""
  if instruction.attribute('custom_call_target') != PALLAS_TPU_TARGET:
    return None
  custom = backend_config(instruction).get('custom_call_config', {})
  declared = custom.get('cost_estimate')
  return ({key: float(value) for key, value in declared.items()}
          if declared else None)


def pallas_kernel_name(instruction: Instruction) -> str:
  """The name given to pl.pallas_call: the scope its op_name ends in
  ('.../fused_mlp_forward/pallas_call'), else the instruction's."""
  found = re.search(r'([^/]+)/pallas_call$',
                    instruction.attribute('op_name') or '')
  return found.group(1) if found else instruction.name


def fused_attention_flops(call: Instruction, shapes: dict[str, str]) -> float:
  """cuDNN flash attention: 2 matmuls of [Sq, D] x [D, Skv] size per head
  forward (Q K^T, P V), 5 backward (S recomputed, dV, dP, dQ, dK)."""
  config = backend_config(call)['cudnn_fmha_backend_config']
  logits = [int(d) for d in config['intermediate_tensor_shape']['dimensions']]
  head_dim = array_shapes(shapes[call.operands[0]])[0][1][-1]
  matmuls = 5 if call.attribute('custom_call_target').endswith('Backward') else 2
  return 2 * matmuls * math.prod(logits) * head_dim


def own_work(instruction: Instruction,
             shapes: dict[str, str]) -> tuple[str | None, float]:
  """('gemm' | 'convolution' | 'attention' | None, FLOPs) of one
  instruction itself."""
  target = instruction.attribute('custom_call_target') or ''
  if target.startswith('__cudnn$fmha'):
    return 'attention', fused_attention_flops(instruction, shapes)
  if instruction.opcode == 'dot' or 'gemm' in target or 'matmul' in target:
    return 'gemm', dot_flops(instruction, shapes)
  if instruction.opcode == 'convolution' or 'conv' in target:
    return 'convolution', convolution_flops(instruction, shapes)
  return None, 0.0


class Module:
  """A parsed HLO module: its computations and the shapes of their values."""

  def __init__(self, hlo_text: str):
    self.computations, self.entry = parse_module(hlo_text)
    self.shapes = {i.name: i.shape for body in self.computations.values()
                   for i in body}

  def work(self, instruction: Instruction) -> tuple[str | None, float]:
    """own_work of an instruction and of the computations it calls (a
    fusion around a dot is a gemm)."""
    kind, flops = own_work(instruction, self.shapes)
    called = instruction.attribute('calls')
    for inner in self.computations.get(called, []) if called else []:
      inner_kind, inner_flops = self.work(inner)
      kind, flops = kind or inner_kind, flops + inner_flops
    return kind, flops

  def parameter_bytes_read(self, fused: str, index: int, full: float,
                           update: Instruction | None) -> float:
    """Bytes a fusion reads of its `index`-th operand: the slices taken of
    it when slices are all its uses inside the fused computation, none when
    its only use is as the buffer that `update` (the fusion's
    in_place_update, or None) updates in place, else all (bitcasts of it
    count as it)."""
    body = self.computations[fused]
    parameter = next(i.name for i in body if i.opcode == 'parameter'
                     and i.arguments == str(index))
    views = {parameter}  # the parameter and its bitcasts
    for instruction in body:  # in order: a bitcast follows its operand
      if instruction.opcode == 'bitcast' and instruction.operands[0] in views:
        views.add(instruction.name)
    users = [i for i in body if i.opcode != 'bitcast'
             and views.intersection(i.operands)]
    if users and all(u.opcode in SLICES and u.operands[0] in views
                     and not views.intersection(u.operands[1:]) for u in users):
      return sum(shape_bytes(u.shape) for u in users)
    if (update is not None and users == [update] and update.operands[0] in views
        and not views.intersection(update.operands[1:])):
      return 0.0
    return full

  def in_place_update(self, fused: str) -> Instruction | None:
    """The dynamic-update-slice at the root of a fused computation (through
    bitcasts), else None: XLA updates its operand 0 in place, writing the
    update only."""
    body = self.computations[fused]
    root = next((i for i in body if i.is_root), None)
    by_name = {i.name: i for i in body}
    while root is not None and root.opcode == 'bitcast':
      root = by_name.get(root.operands[0])
    return root if root is not None and root.opcode == 'dynamic-update-slice' else None

  def kernel(self, instruction: Instruction, runs: float = 1.0) -> Kernel:
    operand_bytes = [shape_bytes(self.shapes[name])
                     for name in instruction.operands]
    outputs = array_shapes(instruction.shape)
    target = instruction.attribute('custom_call_target') or ''
    if target.startswith(WORKSPACE_TARGETS) and outputs[-1][0] in ('s8', 'u8'):
      outputs = outputs[:-1]  # the library's scratch space
    called = instruction.attribute('calls')
    output_bytes = arrays_bytes(outputs)
    update = None
    if instruction.opcode == 'dynamic-update-slice':
      update, operand_bytes[0] = instruction, 0.0
    if instruction.opcode == 'fusion':
      update = self.in_place_update(called)
      operand_bytes = [self.parameter_bytes_read(called, i, b, update)
                       for i, b in enumerate(operand_bytes)]
    if update is not None:  # in place: only the update is written
      output_bytes = shape_bytes(self.shapes[update.operands[1]])
    if instruction.opcode == 'copy-start':  # (destination, source, context)
      # Written to memory once, not at all when the destination is on chip.
      output_bytes = 0.0 if ON_CHIP.match(instruction.shape) else sum(operand_bytes)
    kind, flops = self.work(instruction)
    moved = sum(operand_bytes) + output_bytes
    name, declared = instruction.name, declared_cost(instruction)
    if declared is not None:
      kind, flops, moved = 'pallas', declared['flops'], declared['bytes_accessed']
      name = pallas_kernel_name(instruction)
    return Kernel(name, instruction.opcode,
                  kind or instruction.opcode, flops, moved,
                  instruction.attribute('op_name') or '', instruction.shape,
                  runs)

  def kernels(self) -> list[Kernel]:
    """Every kernel of the entry computation, of the while loops' bodies
    and conditions and of the conditionals' branches, with its expected
    runs per call (module doc)."""
    found = []

    def walk(computation: str, runs: float) -> None:
      for instruction in self.computations[computation]:
        if instruction.opcode == 'while':
          trips = trip_count(instruction)
          walk(instruction.attribute('body'), runs * trips)
          walk(instruction.attribute('condition'), runs * (trips + 1))
        elif instruction.opcode == 'conditional':
          branches = instruction.branches()
          for branch in branches:
            walk(branch, runs / len(branches))
        elif instruction.opcode not in FREE:
          found.append(self.kernel(instruction, runs))

    walk(self.entry, 1.0)
    return found



# ----------------------------------------------------------------- phases ---

# The train step runs its optimizer update under this jax.named_scope
# (stat_jax/train_step.py), so its kernels' op_names carry it.
OPTIMIZER_SCOPE = 'optimizer/'


def phase(kernel: Kernel, train: bool) -> str:
  """'copies' (asynchronous copies), else 'forward', 'backward',
  'optimizer' or 'other' (augmentation, mixup, the loss's scalars): in a
  train step, from the jax transformations and scopes in the kernel's
  op_name."""
  if kernel.opcode == 'copy-start':
    return 'copies'  # XLA's asynchronous copies, prefetches into VMEM
  if not train:
    return 'forward'
  if 'transpose(' in kernel.op_name:
    return 'backward'
  if 'jvp(' in kernel.op_name:
    return 'forward'
  return 'optimizer' if OPTIMIZER_SCOPE in kernel.op_name else 'other'


def roofline_seconds(kernel: Kernel, peak_flops: float,
                     bandwidth: float) -> float:
  """The longer of its FLOPs at the peak and its bytes at the bandwidth,
  per run."""
  return max(kernel.flops / peak_flops, kernel.bytes / bandwidth)


# ------------------------------------------------------------ collectives ---

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all',
               'collective-permute')


@dataclasses.dataclass
class Collective:
  name: str
  kind: str  # one of COLLECTIVES
  # The larger of its operands and its results: the whole of what it
  # gathers, reduces or exchanges, as each device holds it before or after.
  bytes: float
  count: int  # runs per call of the program (while loops' trip counts)
  over_dcn: bool = False  # between slices (a megascale send)


def collective_kind(opcode: str) -> str | None:
  """'all-gather' for 'all-gather' and its async 'all-gather-start' (the
  '-done' half moves nothing); None for other opcodes."""
  kind = opcode.removesuffix('-start')
  return kind if kind in COLLECTIVES else None


MEGASCALE_TRANSFER = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def dcn_collective_kind(instruction: Instruction) -> str | None:
  """'all-reduce' for a send of an ALL_REDUCE to the megascale runtime
  (its recv moves the same bytes back); None for other instructions."""
  found = (MEGASCALE_TRANSFER.search(instruction.attributes)
           if instruction.opcode == 'send' else None)
  return found.group(1).lower().replace('_', '-') if found else None


def trip_count(loop: Instruction) -> int:
  """The trip count XLA proved for a while loop, else 1."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
  return int(known.group(1)) if known else 1


def collective_bytes(instruction: Instruction, shapes: dict[str, str]) -> float:
  operands = sum(shape_bytes(shapes[name]) for name in instruction.operands)
  results = shape_bytes(instruction.shape)
  if instruction.opcode.endswith('-start'):  # its shape may hold the operands
    results = max(results - operands, 0.0)
  return max(operands, results)


def collectives(module: Module) -> list[Collective]:
  """Every collective the program runs: in the entry computation, in the
  computations it calls (fusions, async wrappers) and in while bodies."""
  found = []

  def walk(computation: str, runs: int) -> None:
    for instruction in module.computations[computation]:
      kind = collective_kind(instruction.opcode)
      dcn_kind = dcn_collective_kind(instruction)
      if kind:
        found.append(Collective(instruction.name, kind,
                                collective_bytes(instruction, module.shapes),
                                runs))
      elif dcn_kind:
        sent = module.shapes[instruction.operands[0]]
        found.append(Collective(instruction.name, dcn_kind, shape_bytes(sent),
                                runs, over_dcn=True))
      elif instruction.opcode == 'while':
        walk(instruction.attribute('body'), runs * trip_count(instruction))
      elif instruction.attribute('calls') in module.computations:
        walk(instruction.attribute('calls'), runs)

  walk(module.entry, 1)
  return found
