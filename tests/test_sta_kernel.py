"""The fused STA kernels (attention_impl 'pallas', interpret mode on the CPU)
against the XLA path, and the cost each kernel declares against one
recounted from its grid and block shapes."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_on_cpu_devices
from configs import tiny
from stat_jax import attention as sta_lib
from stat_jax.kernels import common, sta_attention
from stat_jax.checks.errors import UserError
from stat_jax.build import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Clips, frames, heads, queries per frame, K_CA (+ class token), K_SA, head width.
B, NT, HEADS, NQ, NK, NSA, D = 2, 4, 2, 20, 5, 4, 16


def inputs(dtype, seed=0):
  """q, k, v, k_sa, v_sa as shrinking_temporal_attention takes them."""
  keys = jax.random.split(jax.random.key(seed), 5)
  shapes = [(B, NT, HEADS, NQ, D), *[(B, NT, HEADS, NK, D)] * 2,
            *[(B, NT, HEADS, NSA, D)] * 2]
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype)
          for key, shape in zip(keys, shapes)]


def attend(impl, attention, window, num_summary):
  """sum(out * weights) of STA by `impl`, to take values and gradients of."""
  weights = jax.random.normal(jax.random.key(9), (B, NT, HEADS, NQ, D))

  def loss(q, k, v, k_sa, v_sa):
    out = sta_lib.shrinking_temporal_attention(
        q, k, v, k_sa, v_sa, attention=attention, window=window,
        num_summary=num_summary, impl=impl)
    return (out.astype(jnp.float32) * weights).sum(), out
  return jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))


@pytest.fixture
def small_tiles(monkeypatch):
  """Tiles of 8 query rows: 20 queries fill 3 tiles, the last one padded
  with 4 rows."""
  monkeypatch.setattr(sta_attention, 'MAX_BLOCK_Q', 8)
  assert sta_attention.block_rows(NQ) == 8


# (attention, window, num_summary, dtype, tolerance relative to the largest
# value). Window 5 over 4 frames: every frame has neighbours outside the
# clip, the first and last frames two of four. bfloat16: both paths round
# their inputs and probabilities to 8 bits, in different orders.
CASES = [
    ('ca+sa+la', 5, 1, jnp.float32, 2e-6),
    ('ca+sa+la', 3, 1, jnp.bfloat16, 2e-2),
]
EXTRA_CASES = [  # the ablations: no SA or LA, avg-pooled summaries
    ('ca', 3, 1, jnp.float32, 2e-6),
    ('ca+sa', 3, 0, jnp.float32, 2e-6),
    ('ca+la', 3, 0, jnp.float32, 2e-6),
]


def check_against_xla(attention, window, num_summary, dtype, tolerance):
  args = inputs(dtype)
  (_, want), want_grads = attend('xla', attention, window, num_summary)(*args)
  (_, got), got_grads = attend('pallas', attention, window, num_summary)(*args)
  assert got.dtype == dtype
  for name, g, w in zip(('out', 'q', 'k', 'v', 'k_sa', 'v_sa'),
                        (got, *got_grads), (want, *want_grads)):
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0,
                               atol=tolerance * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize('attention,window,num_summary,dtype,tolerance', CASES)
def test_kernel_values_and_gradients_match_xla(attention, window, num_summary,
                                               dtype, tolerance, small_tiles):
  check_against_xla(attention, window, num_summary, dtype, tolerance)


@pytest.mark.ci_extra
@pytest.mark.parametrize('attention,window,num_summary,dtype,tolerance',
                         EXTRA_CASES)
def test_kernel_ablations_match_xla(attention, window, num_summary, dtype,
                                    tolerance, small_tiles):
  check_against_xla(attention, window, num_summary, dtype, tolerance)


def test_class_token_keys_count_only_through_la(small_tiles):
  """Changing frame 0's class-token key moves every frame's output under
  'ca+sa+la' (K_LA), and none under 'ca+sa' (masked in K_CA)."""
  q, k, v, k_sa, v_sa = inputs(jnp.float32)
  moved = k.at[:, 0, :, 0].add(3.0)
  for attention, changes in (('ca+sa+la', True), ('ca+sa', False)):
    run = jax.jit(lambda k: sta_lib.shrinking_temporal_attention(
        q, k, v, k_sa, v_sa, attention=attention, window=3, num_summary=1,
        impl='pallas'))
    changed = np.abs(run(moved) - run(k)).max(axis=(0, 2, 3, 4))  # [nt]
    assert (changed > 1e-4).all() if changes else (changed == 0).all()


def test_pallas_is_refused_on_a_gpu():
  resolve = sta_lib.resolve_attention_impl
  assert resolve('pallas', 'tpu') == resolve('pallas', 'cpu') == 'pallas'
  assert resolve('auto', 'tpu') == 'pallas'  # STAT's attention on a TPU
  assert resolve('auto', 'tpu', 'mvit') == resolve('auto', 'cpu') == 'xla'
  with pytest.raises(UserError, match=r"attention_impl = 'pallas'.*GPU"):
    resolve('pallas', 'gpu')


def layout_and_shapes():
  """A layout of 3 query tiles with SA (window 5) and LA, and its shapes."""
  index, valid = sta_lib.window_table(NT, 5)
  layout = dataclasses.replace(
      sta_attention.make_layout(NQ, 1, index, valid, True), block_q=8)
  struct = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  q, k = struct(B, NT, HEADS, NQ, D), struct(B, NT, HEADS, NK, D)
  sa = (struct(B, NT, HEADS, NSA, D),) * 2
  la = (struct(B, HEADS, NT, D),) * 2
  return layout, q, k, sa, la


def recounted_bytes(layout, q, k, sa, la, key_grad_dtype=None):
  """Bytes moved, walking the grid: every block copied whenever its index
  changes, at its padded size; key gradients (backward) in float32."""
  grid, q_spec, kv_spec, sa_spec, la_spec = sta_attention.grid_and_specs(
      layout, q.shape, k.shape, sa[0].shape, la[0].shape)
  window = np.asarray(layout.window)

  def moved(spec, dtype):
    shape = [n for n in spec.block_shape if n is not None]
    return (common.block_fetches(grid, spec.index_map, window)
            * common.padded_bytes(shape, dtype))
  keys = 2 * moved(kv_spec, k.dtype) + 2 * moved(sa_spec, k.dtype) + 2 * moved(
      la_spec, k.dtype)
  queries = moved(q_spec, q.dtype)
  if key_grad_dtype is None:  # forward: q in, out
    return 2 * queries + keys + 4 * window.size
  grads = 2 * (moved(kv_spec, key_grad_dtype) + moved(sa_spec, key_grad_dtype)
               + moved(la_spec, key_grad_dtype))
  return 3 * queries + keys + grads + 4 * window.size  # q, dO in; dQ out


def test_declared_costs_match_a_recount_from_the_grid():
  layout, q, k, sa, la = layout_and_shapes()
  grid = (B, HEADS, NT, 3)
  # Every step scores 8 query rows (4 of them padding in the last tile)
  # against 5 K_CA, 4 x 4 K_SA and 4 K_LA keys.
  logits = np.prod(grid) * 8 * (NK + 4 * NSA + NT)
  forward = sta_attention.forward_cost(layout, q, k, k, sa, la)
  assert forward.flops == logits * (4 * D + 4)
  assert forward.transcendentals == logits
  assert forward.bytes_accessed == recounted_bytes(layout, q, k, sa, la)
  backward = sta_attention.backward_cost(layout, q, k, k, sa, la)
  assert backward.flops == logits * (10 * D + 8)
  assert backward.bytes_accessed == recounted_bytes(layout, q, k, sa, la,
                                                    jnp.float32)


def test_padded_bytes_hand_worked():
  # 20 x 16 bfloat16 rows pad to 32 x 128 (16-row tiles); float32 to 24 x 128.
  assert common.padded_bytes((20, 16), jnp.bfloat16) == 32 * 128 * 2
  assert common.padded_bytes((3, 20, 16), jnp.float32) == 3 * 24 * 128 * 4
  assert common.padded_bytes((5,), jnp.float32) == 8 * 128 * 4
  # Index (b, 0): copied again only when b changes.
  assert common.block_fetches((3, 4), lambda b, t: (b, 0)) == 3


@pytest.mark.ci_extra  # a minute: every stage's kernels interpreted
def test_tiny_stat_pallas_matches_xla():
  """Logits and parameter gradients of the tiny STAT, 'pallas' against
  'xla' (float32: same up to summation order)."""
  video = jax.random.normal(jax.random.key(3), (2, 8, 32, 32, 3))
  results = {}
  for impl in ('xla', 'pallas'):
    config = tiny.get_config()
    config.model.attention_impl = impl
    model = nnx.jit(lambda: build_model(config, rngs=nnx.Rngs(0)))()
    model.eval()
    loss = lambda model: (model(video) ** 2).sum() / 2
    results[impl] = nnx.jit(lambda model: (
        model(video), nnx.grad(loss)(model)))(model)
  (want_logits, want_grads), (got_logits, got_grads) = (
      results['xla'], results['pallas'])
  np.testing.assert_allclose(got_logits, want_logits, rtol=1e-5, atol=1e-5)
  want_leaves = jax.tree.leaves(nnx.state(want_grads))
  got_leaves = jax.tree.leaves(nnx.state(got_grads))
  assert len(got_leaves) == len(want_leaves) > 50
  for got, want in zip(got_leaves, want_leaves):
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=1e-5 * float(np.abs(want).max()) + 1e-7)


SPLIT_CLIPS = '''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from stat_jax import attention as sta_lib
mesh = Mesh(np.array(jax.devices()).reshape(2, 1), ('data', 'fsdp'))
clips = NamedSharding(mesh, PartitionSpec(('data', 'fsdp')))
keys = jax.random.split(jax.random.key(0), 5)
shapes = [(4, 4, 2, 20, 16), *[(4, 4, 2, 5, 16)] * 2, *[(4, 4, 2, 4, 16)] * 2]
args = [jax.device_put(jax.random.normal(key, shape), clips)
        for key, shape in zip(keys, shapes)]
def loss(impl):
  return jax.jit(jax.value_and_grad(lambda *a: jnp.sin(
      sta_lib.shrinking_temporal_attention(
          *a, attention='ca+sa+la', window=3, num_summary=1, impl=impl)).sum(),
      argnums=range(5)))
(got, got_grads), (want, want_grads) = loss('pallas')(*args), loss('xla')(*args)
print(json.dumps([float(abs(got - want))] + [float(jnp.abs(g - w).max())
                 for g, w in zip(got_grads, want_grads)]))
'''


@pytest.mark.ci_extra  # a subprocess on 2 devices: about 15 s
def test_clips_split_over_devices_match_xla():
  """Under a mesh each device runs the kernels on its own clips (XLA
  cannot split a Mosaic kernel): same values and gradients as 'xla'."""
  errors = run_on_cpu_devices(SPLIT_CLIPS, 2)
  assert max(errors) < 1e-4, errors


# ALLOW_MULTIPLE_LIBTPU_LOAD: another test worker may hold libtpu's lock.
LOWER_FOR_TPU = '''
import os
os.environ.update(TPU_WORKER_HOSTNAMES='localhost', TPU_ACCELERATOR_TYPE='v5p-8',
                  ALLOW_MULTIPLE_LIBTPU_LOAD='1')
import jax, jax.numpy as jnp, numpy as np
jax.config.update('jax_platforms', 'cpu')
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from stat_jax import attention as sta_lib
devices = topologies.get_topology_desc(platform='tpu',
                                       topology_name='v5p:2x2x1').devices
mesh = Mesh(np.array(devices[:1]), ('x',))
struct = lambda *shape: jax.ShapeDtypeStruct(
    shape, jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
args = (struct(2, 4, 2, 40, 96), *[struct(2, 4, 2, 10, 96)] * 2,
        *[struct(2, 4, 2, 4, 96)] * 2)
loss = lambda *a: sta_lib.shrinking_temporal_attention(
    *a, attention='ca+sa+la', window=3, num_summary=1,
    impl='pallas').astype(jnp.float32).sum()
lowered = jax.jit(jax.value_and_grad(loss, argnums=range(5))).lower(*args)
print(lowered.as_text().count('tpu_custom_call'),
      int(lowered.compile().cost_analysis()['flops']))
'''


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu not installed (pip install "jax[tpu]")')
def test_kernels_lower_for_a_tpu_mesh():
  """Forward and backward kernels compile as Mosaic custom calls for v5p,
  and the program's FLOPs include what they declare."""
  result = subprocess.run(
      [sys.executable, '-c', LOWER_FOR_TPU], cwd=ROOT, capture_output=True,
      text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT),
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  kernels, program_flops = map(int, result.stdout.split()[-2:])
  assert kernels == 2
  index, valid = sta_lib.window_table(4, 3)
  layout = sta_attention.make_layout(40, 1, index, valid, True)
  struct = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  q, k = struct(2, 4, 2, 40, 96), struct(2, 4, 2, 10, 96)
  sa, la = (struct(2, 4, 2, 4, 96),) * 2, (struct(2, 2, 4, 96),) * 2
  declared = sum(cost(layout, q, k, k, sa, la).flops for cost in (
      sta_attention.forward_cost, sta_attention.backward_cost))
  assert declared <= program_flops < 1.5 * declared


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu not installed (pip install "jax[tpu]")')
def test_the_tiny_config_compiles_for_a_v5e_slice_with_the_kernels():
  """The tiny train step with attention_impl 'pallas', 4 chips data
  parallel: each chip runs the kernels on its clips."""
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.aot', '--config=configs/tiny.py',
       '--topology=v5e:2x2', '--batch_per_chip=2', '--json',
       '--config.model.attention_impl=pallas'], cwd=ROOT, capture_output=True,
      text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT,
                                       ALLOW_MULTIPLE_LIBTPU_LOAD='1'),
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.splitlines()[-1])
  assert report['chips'] == 4 and report['fits']
