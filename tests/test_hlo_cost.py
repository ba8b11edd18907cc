"""benchmarks/hlo_cost.py and the roofline of benchmarks/roofline.py: FLOPs
and bytes of compiled kernels against hand counts, XLA's own cost analysis
and the model's FLOP counter."""

import math

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from benchmarks import hlo_cost, measure, roofline
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
