"""benchmarks/hlo_cost.py and the roofline of benchmarks/roofline.py: FLOPs
and bytes of compiled kernels against hand counts, XLA's own cost analysis
and the model's FLOP counter."""

import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from benchmarks import hlo_cost, measure, roofline, step_kernels
from configs import tiny


def compiled_kernels(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return hlo_cost.Module(compiled.as_text()).kernels(), compiled


def test_dot_by_hand_and_as_xla_counts_its_bytes():
  x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
  kernels, compiled = compiled_kernels(jnp.dot, x, w)
  (kernel,) = kernels
  assert kernel.kind == 'gemm'
  assert kernel.flops == 2 * 64 * 32 * 48
  assert kernel.bytes == 4 * (64 * 32 + 32 * 48 + 64 * 48)
  assert kernel.bytes == compiled.cost_analysis()['bytes accessed']


def test_element_wise_fusion_reads_its_operands_and_writes_its_output():
  a = jnp.ones((256, 256))
  kernels, compiled = compiled_kernels(lambda a, b: jnp.tanh(a) * b + 1, a, a)
  assert sum(k.bytes for k in kernels) == 3 * 4 * 256 * 256
  assert sum(k.flops for k in kernels) == 0  # element-wise work not counted
  assert sum(k.bytes for k in kernels) == compiled.cost_analysis()['bytes accessed']


def test_a_fusion_reading_a_slice_counts_the_slice_only():
  kernels, _ = compiled_kernels(lambda a: a[:, :8] * 2 + 1, jnp.ones((256, 256)))
  assert sum(k.bytes for k in kernels) == 2 * 4 * 256 * 8


def test_grouped_strided_convolution_by_hand():
  x = jnp.ones((2, 9, 9, 8))
  w = jnp.ones((3, 3, 4, 6))  # 2 groups of 4 input channels
  numbers = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  kernels, _ = compiled_kernels(
      lambda x, w: lax.conv_general_dilated(
          x, w, (2, 2), [(1, 1), (1, 1)], dimension_numbers=numbers,
          feature_group_count=2), x, w)
  out_elements = 2 * 5 * 5 * 6
  assert sum(k.flops for k in kernels) == 2 * out_elements * 3 * 3 * 4
  assert 'convolution' in {k.kind for k in kernels}


DOT_AS_CONVOLUTION = '''HloModule jit_step, entry_computation_layout={()->f32[2,%d,3]}

ENTRY %%main (x: f32[2,%d,5], k: f32[8,5,3]) -> f32[2,%d,3] {
  %%x = f32[2,%d,5]{2,1,0} parameter(0)
  %%k = f32[8,5,3]{2,1,0} parameter(1)
  ROOT %%conv = f32[2,%d,3]{2,1,0} convolution(%%x, %%k), window={%s}, dim_labels=b0f_0io->b0f
}
'''


@pytest.mark.parametrize('inputs, window, outputs', [
    (1, 'size=8 pad=7_7 rhs_reversal=1', 8),  # each output meets 1 tap
    (4, 'size=8 stride=7 lhs_dilate=8', 3),  # inputs 8 apart: 1 tap each
])
def test_a_dot_batch_dimension_written_as_a_convolution_by_hand(
    inputs, window, outputs):
  """XLA:TPU writes some dots' batch dimensions as a spatial dimension
  whose window of 8 meets one input element per output: 2 x outputs x 3
  results of 5 multiply-adds each, not of 8 x 5."""
  hlo = DOT_AS_CONVOLUTION % (outputs, inputs, outputs, inputs, outputs,
                              window)
  (conv,) = hlo_cost.Module(hlo).kernels()
  assert (conv.kind, conv.flops) == ('convolution', 2 * (2 * outputs * 3) * 5)


def test_hlo_flops_of_the_forward_pass_equal_the_models_flop_counter():
  """Two independent counts: stat_jax.flops walks the model's jaxpr; this
  reads the dots and convolutions XLA compiled (lax convolutions, so the
  pooling convs are convolutions in the HLO too)."""
  config = tiny.get_config()
  config.model.conv_impl = 'xla'
  compiled = roofline.compiled_step(config, batch=2, train=False, device=None)
  kernels = hlo_cost.Module(compiled.as_text()).kernels()
  assert sum(k.flops for k in kernels) / 2 == measure.flops_per_clip(config, False)


GPU_HLO = '''HloModule jit_step, entry_computation_layout={()->f32[]}

ENTRY %main (x: bf16[64,32], w: bf16[32,48], g: bf16[2,8,5,5], k: bf16[8,4,3,3], q: bf16[4,10,2,16], kv: bf16[4,6,2,16]) -> bf16[64,48] {
  %x = bf16[64,32]{1,0} parameter(0)
  %w = bf16[32,48]{1,0} parameter(1)
  %g = bf16[2,8,5,5]{3,2,1,0} parameter(2)
  %k = bf16[8,4,3,3]{3,2,1,0} parameter(3)
  %q = bf16[4,10,2,16]{3,2,1,0} parameter(4)
  %kv = bf16[4,6,2,16]{3,2,1,0} parameter(5)
  %gemm = (bf16[64,48]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp()/dot_general"}, backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %out = bf16[64,48]{1,0} get-tuple-element(%gemm), index=0
  %dgrad = (bf16[2,4,9,9]{3,2,1,0}, u8[0]{0}) custom-call(%g, %k), window={size=3x3 stride=2x2 pad=1_1x1_1}, dim_labels=bf01_oi01->bf01, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(step)/transpose(jvp())/conv_general_dilated"}, backend_config={"cudnn_conv_backend_config":{}}
  %attention = (bf16[4,2,10,16]{3,1,2,0}, f32[4,2,10]{2,1,0}, u8[0]{0}) custom-call(%q, %kv, %kv), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/jvp()/dot_product_attention_fwd"}, backend_config={"operation_queue_id": "0", "cudnn_fmha_backend_config": {"fmha_scale": 0.25, "intermediate_tensor_shape": {"element_type": "BF16", "dimensions": ["4", "2", "10", "6"]}}}
  ROOT %copy = bf16[64,48]{0,1} copy(%out)
}
'''


def test_gpu_library_calls_by_hand():
  """cuBLAS gemm, cuDNN input gradient and flash attention as XLA:GPU
  prints them: FLOPs of the (forward) operation, scratch space not counted."""
  kernels = {k.name: k for k in hlo_cost.Module(GPU_HLO).kernels()}
  assert set(kernels) == {'gemm', 'dgrad', 'attention', 'copy'}
  gemm, dgrad, attention = kernels['gemm'], kernels['dgrad'], kernels['attention']
  assert (gemm.kind, gemm.flops) == ('gemm', 2 * 64 * 32 * 48)
  assert gemm.bytes == 2 * (64 * 32 + 32 * 48 + 64 * 48)  # not the workspace
  # The forward conv: [2, 4, 9, 9] -> [2, 8, 5, 5] with a 3x3 kernel of 4 inputs.
  assert (dgrad.kind, dgrad.flops) == ('convolution', 2 * (2 * 8 * 5 * 5) * 3 * 3 * 4)
  assert dgrad.bytes == 2 * (2 * 8 * 5 * 5 + 8 * 4 * 3 * 3 + 2 * 4 * 9 * 9)
  # Q K^T and P V per head: 2 matmuls of 10 x 6 x 16.
  assert (attention.kind, attention.flops) == ('attention', 2 * 2 * (4 * 2 * 10 * 6) * 16)
  assert attention.bytes == 2 * (4 * 10 * 2 * 16 + 2 * 4 * 6 * 2 * 16
                                 + 4 * 2 * 10 * 16) + 4 * 4 * 2 * 10
  assert kernels['copy'].bytes == 2 * 2 * 64 * 48
  assert {name: step_kernels.operation(k) for name, k in kernels.items()} == {
      'gemm': 'matmul', 'dgrad': 'convolution',
      'attention': 'dot_product_attention_fwd', 'copy': 'copy'}
  assert {name: step_kernels.category(k) for name, k in kernels.items()} == {
      'gemm': 'matmul', 'dgrad': 'convolution', 'attention': 'attention',
      'copy': 'layout'}


def test_step_kernels_lists_an_hlo_file_by_phase_category_and_operation(
    tmp_path):
  path = tmp_path / 'step.hlo'
  path.write_text(GPU_HLO)
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.step_kernels', str(path),
       '--chip=H100'], capture_output=True, text=True, check=True,
      cwd=pathlib.Path(__file__).parent.parent)
  lines = result.stdout.splitlines()
  assert lines[0].startswith('4 kernels; roofline time at H100')
  gemm_bytes = 2 * (64 * 32 + 32 * 48 + 64 * 48) / 1e9
  assert any(re.search(rf'forward matmul +1 kernels, +{gemm_bytes:.2f} GB',
                       line) for line in lines), lines


def kernel(name, flops, bytes_, op_name):
  return hlo_cost.Kernel(name, 'fusion', 'gemm' if flops else 'fusion', flops,
                         bytes_, op_name, 'f32[1]')


def test_roofline_times_each_kernel_by_its_slower_limit():
  kernels = [
      kernel('matmul', 4e12, 1e9, 'jit(s)/jvp()/dot_general'),  # 4 ms of FLOPs
      kernel('norm', 0, 6e9, 'jit(s)/transpose(jvp())/mul'),  # 6 ms of bytes
      kernel('adam', 0, 2e9, 'jit(s)/mul'),  # 2 ms of bytes
  ]
  report = roofline.roofline(kernels, peak_flops=1e15, bandwidth=1e12,
                             clips=2, model_flops=3e12, train=True)
  assert report['seconds_per_clip'] == pytest.approx(6e-3)  # (4 + 6 + 2) / 2
  assert report['bytes_bound_share'] == pytest.approx(8 / 12)
  assert report['mfu_bound'] == pytest.approx(3e12 / 6e-3 / 1e15)
  assert list(report['groups']) == ['fusion backward', 'gemm forward', 'fusion other']
  assert report['groups']['gemm forward']['flops'] == 2e12
  assert [k['name'] for k in report['top_kernels']] == ['norm', 'matmul', 'adam']
  assert math.isclose(report['top_kernels'][1]['ms'], 4.0)


# lax.map of a 3-way lax.switch over the 8 rows of x, as XLA prints it: a
# while loop of known trip count 8 whose body slices a row, runs one of 3
# branches on it and updates the result in place; its condition compares.
STATE = '(s32[], f32[8,1024]{1,0}, f32[8,1024]{1,0}, s32[])'
LOOP_HLO = f'''HloModule jit_map, entry_computation_layout={{(f32[8,1024]{{1,0}}, s32[])->f32[8,1024]{{1,0}}}}

%double_computation (p0: f32[1024]) -> f32[1024] {{
  %p0 = f32[1024]{{0}} parameter(0)
  %two = f32[] constant(2)
  %twos = f32[1024]{{0}} broadcast(%two), dimensions={{}}
  ROOT %doubled = f32[1024]{{0}} multiply(%p0, %twos)
}}

%branch_double (a0: (f32[1024])) -> (f32[1024]) {{
  %a0 = (f32[1024]{{0}}) parameter(0)
  %row0 = f32[1024]{{0}} get-tuple-element(%a0), index=0
  %double = f32[1024]{{0}} fusion(%row0), kind=kLoop, calls=%double_computation
  ROOT %out0 = (f32[1024]{{0}}) tuple(%double)
}}

%widen_computation (p1: f32[1024]) -> f32[2048] {{
  %p1 = f32[1024]{{0}} parameter(0)
  ROOT %both = f32[2048]{{0}} concatenate(%p1, %p1), dimensions={{0}}
}}

%narrow_computation (p2: f32[2048]) -> f32[1024] {{
  %p2 = f32[2048]{{0}} parameter(0)
  %negated = f32[2048]{{0}} negate(%p2)
  ROOT %half = f32[1024]{{0}} slice(%negated), slice={{[0:1024]}}
}}

%branch_widen_narrow (a1: (f32[1024])) -> (f32[1024]) {{
  %a1 = (f32[1024]{{0}}) parameter(0)
  %row1 = f32[1024]{{0}} get-tuple-element(%a1), index=0
  %widen = f32[2048]{{0}} fusion(%row1), kind=kLoop, calls=%widen_computation
  %narrow = f32[1024]{{0}} fusion(%widen), kind=kLoop, calls=%narrow_computation
  ROOT %out1 = (f32[1024]{{0}}) tuple(%narrow)
}}

%branch_keep (a2: (f32[1024])) -> (f32[1024]) {{
  %a2 = (f32[1024]{{0}}) parameter(0)
  %row2 = f32[1024]{{0}} get-tuple-element(%a2), index=0
  %keep = f32[1024]{{0}} copy(%row2)
  ROOT %out2 = (f32[1024]{{0}}) tuple(%keep)
}}

%slice_computation (p3: f32[8,1024], p4: s32[]) -> f32[1024] {{
  %p3 = f32[8,1024]{{1,0}} parameter(0)
  %p4 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[1,1024]{{1,0}} dynamic-slice(%p3, %p4, %zero), dynamic_slice_sizes={{1,1024}}
  ROOT %row = f32[1024]{{0}} bitcast(%ds)
}}

%update_computation (p5: f32[8,1024], p6: s32[], p7: f32[1024]) -> f32[8,1024] {{
  %p5 = f32[8,1024]{{1,0}} parameter(0)
  %p7 = f32[1024]{{0}} parameter(2)
  %new = f32[1,1024]{{1,0}} bitcast(%p7)
  %p6 = s32[] parameter(1)
  %zero.1 = s32[] constant(0)
  ROOT %dus = f32[8,1024]{{1,0}} dynamic-update-slice(%p5, %new, %p6, %zero.1)
}}

%add_computation (p8: s32[], p9: s32[]) -> s32[] {{
  %p8 = s32[] parameter(0)
  %p9 = s32[] parameter(1)
  ROOT %sum = s32[] add(%p8, %p9)
}}

%body (state: {STATE}) -> {STATE} {{
  %state = {STATE} parameter(0)
  %one = s32[] constant(1)
  %i = s32[] get-tuple-element(%state), index=0
  %ys = f32[8,1024]{{1,0}} get-tuple-element(%state), index=1
  %xs = f32[8,1024]{{1,0}} get-tuple-element(%state), index=2
  %which = s32[] get-tuple-element(%state), index=3
  %take = f32[1024]{{0}} fusion(%xs, %i), kind=kLoop, calls=%slice_computation
  %step = s32[] fusion(%i, %one), kind=kLoop, calls=%add_computation
  %operand = (f32[1024]{{0}}) tuple(%take)
  %switch = (f32[1024]{{0}}) conditional(%which, %operand, %operand, %operand), branch_computations={{%branch_double, %branch_widen_narrow, %branch_keep}}
  %result = f32[1024]{{0}} get-tuple-element(%switch), index=0
  %put = f32[8,1024]{{1,0}} fusion(%ys, %i, %result), kind=kLoop, calls=%update_computation
  ROOT %next = {STATE} tuple(%step, %put, %xs, %which)
}}

%compare_computation (p10: s32[], p11: s32[]) -> pred[] {{
  %p10 = s32[] parameter(0)
  %p11 = s32[] parameter(1)
  ROOT %less = pred[] compare(%p10, %p11), direction=LT
}}

%condition (state.1: {STATE}) -> pred[] {{
  %state.1 = {STATE} parameter(0)
  %eight = s32[] constant(8)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  ROOT %more = pred[] fusion(%i.1, %eight), kind=kLoop, calls=%compare_computation
}}

%zeros_computation (p12: f32[]) -> f32[8,1024] {{
  %p12 = f32[] parameter(0)
  ROOT %broadcast = f32[8,1024]{{1,0}} broadcast(%p12), dimensions={{}}
}}

ENTRY %main (x: f32[8,1024], op: s32[]) -> f32[8,1024] {{
  %x = f32[8,1024]{{1,0}} parameter(0)
  %op = s32[] parameter(1)
  %start = s32[] constant(0)
  %zero.2 = f32[] constant(0)
  %zeros = f32[8,1024]{{1,0}} fusion(%zero.2), kind=kLoop, calls=%zeros_computation
  %init = {STATE} tuple(%start, %zeros, %x, %op)
  %loop = {STATE} while(%init), condition=%condition, body=%body, backend_config={{"known_trip_count":{{"n":"8"}}}}
  ROOT %ys.1 = f32[8,1024]{{1,0}} get-tuple-element(%loop), index=1
}}
'''


def test_while_body_runs_trip_count_times_a_branch_its_share():
  """By hand: the body's kernels run 8 times, the condition 9, each of the
  3 branches 8 / 3 times on average; a row is 4 KB; the row slice reads its
  row only and the in-place update writes its row only."""
  kernels = {k.name: k for k in hlo_cost.Module(LOOP_HLO).kernels()}
  row = 4 * 1024
  expected = {  # name: (runs, bytes per run)
      'zeros': (1, 4 + 8 * row),
      'take': (8, row + 4 + row),
      'step': (8, 4 + 4 + 4),
      'double': (8 / 3, row + row),
      'widen': (8 / 3, row + 2 * row),
      'narrow': (8 / 3, 2 * row + row),
      'keep': (8 / 3, row + row),
      'put': (8, 0 + 4 + row + row),
      'more': (9, 4 + 4 + 1),
  }
  assert set(kernels) == set(expected)
  for name, (runs, bytes_) in expected.items():
    assert kernels[name].runs == pytest.approx(runs), name
    assert kernels[name].bytes == bytes_, name
  report = roofline.roofline(list(kernels.values()), peak_flops=1e15,
                             bandwidth=1e9, clips=8, model_flops=1.0,
                             train=False)
  # 32772 + 8 x 16404 + 8 / 3 x 40960 + 9 x 9 bytes, 8 clips, 1 GB/s.
  total = 32772 + 131232 + 8 * 40960 / 3 + 81
  assert report['bytes_per_clip'] == pytest.approx(total / 8)
  assert report['seconds_per_clip'] == pytest.approx(total / 8 / 1e9)


def test_lax_map_of_a_switch_as_xla_compiles_it():
  """XLA proves lax.map's trip count (12 rows) and keeps lax.switch's
  branches apart: a branch kernel runs 12 / 3 times, the loop's compare 13."""
  def step(x, which):
    return jax.lax.map(lambda row: lax.switch(
        which, [lambda r: r * 2., lambda r: jnp.sin(r) + r[::-1],
                lambda r: -r], row), x)

  kernels, _ = compiled_kernels(step, jnp.ones((12, 1024)), 1)
  branch_runs = [k.runs for k in kernels if 'branch_' in k.op_name]
  assert len(branch_runs) >= 3 and branch_runs == pytest.approx([4.0] * len(branch_runs))
  assert max(k.runs for k in kernels) == 13


PREFETCH_HLO = """HloModule prefetch

%double (p: f32[1024]) -> f32[1024] {
  %p = f32[1024]{0} parameter(0)
  ROOT %sum = f32[1024]{0} add(%p, %p)
}

ENTRY %main (x: f32[1024], y: f32[1024]) -> (f32[1024], f32[1024]) {
  %x = f32[1024]{0} parameter(0)
  %y = f32[1024]{0} parameter(1)
  %to_vmem = (f32[1024]{0:T(1024)S(1)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}) copy-start(%x)
  %in_vmem = f32[1024]{0:T(1024)S(1)} copy-done(%to_vmem)
  %to_hbm = (f32[1024]{0:T(1024)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}) copy-start(%y)
  %in_hbm = f32[1024]{0:T(1024)} copy-done(%to_hbm)
  %doubled = f32[1024]{0} fusion(%in_vmem), kind=kLoop, calls=%double
  ROOT %out = (f32[1024]{0}, f32[1024]{0}) tuple(%doubled, %in_hbm)
}
"""


def test_an_asynchronous_copy_moves_its_operand_once():
  """By hand, 4 KB arrays: the prefetch into on-chip memory (S(1)) reads
  4 KB, the copy within memory reads and writes 4 KB; the -done halves
  move nothing; both copies are the 'copies' phase."""
  kernels = {k.name: k for k in hlo_cost.Module(PREFETCH_HLO).kernels()}
  assert set(kernels) == {'to_vmem', 'to_hbm', 'doubled'}
  assert kernels['to_vmem'].bytes == 4096 and kernels['to_hbm'].bytes == 8192
  assert kernels['doubled'].bytes == 8192
  assert [hlo_cost.phase(kernels[n], train=True) for n in ('to_vmem', 'to_hbm')
          ] == ['copies', 'copies']
