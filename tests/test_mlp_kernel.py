"""The fused MLP kernel (stat_jax/kernels/mlp.py, model.mlp_impl 'pallas'),
run by Pallas's interpreter on the CPU, against the model's XLA path
(nnx.LayerNorm, model.Mlp, the skip and drop path as STABlock adds them);
its TPU lowering and its declared costs, recounted by hand.

Shapes are chosen for the edges: 13 and 300 tokens per frame (no whole
number of 8- or 16-row tiles), 48 and 96 channels (less than a 128-lane
tile), several grid steps per core, and a clip whose branch is dropped.
In the model the kernel takes the STA blocks whose MLP's skip is their
input, up to 384 channels (tests/test_model.py covers the rest).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from configs import tiny
from conftest import run_on_cpu_devices
from stat_jax import arch, flops
from stat_jax.checks.errors import UserError
from stat_jax.kernels import common, mlp
from stat_jax.build import abstract_model, build_model
from stat_jax.model import Mlp, STABlock

CHANNELS, HIDDEN, EPS = 48, 96, 1e-6
KEEP = 0.8  # drop-path keep probability: a kept clip's branch is scaled 1 / KEEP
SCALE = jnp.array([1 / KEEP, 0.0])  # clip 0 kept, clip 1 dropped


def xla_modules(dtype):
  """The XLA path's LayerNorm and MLP with random parameters."""
  rngs = nnx.Rngs(1)
  norm = nnx.LayerNorm(CHANNELS, epsilon=EPS, dtype=dtype, rngs=rngs)
  block = Mlp(CHANNELS, HIDDEN, CHANNELS, dtype=dtype, rngs=rngs)
  keys = jax.random.split(jax.random.key(2), 4)  # non-trivial norm and biases
  norm.scale[...] = 1 + 0.2 * jax.random.normal(keys[0], (CHANNELS,))
  norm.bias[...] = 0.2 * jax.random.normal(keys[1], (CHANNELS,))
  block.fc1.bias[...] = 0.2 * jax.random.normal(keys[2], (HIDDEN,))
  block.fc2.bias[...] = 0.2 * jax.random.normal(keys[3], (CHANNELS,))
  return norm, block


def as_weights(norm, block, dtype) -> mlp.MlpWeights:
  return mlp.MlpWeights(norm.scale[...], norm.bias[...],
                        block.fc1.kernel[...].astype(dtype), block.fc1.bias[...],
                        block.fc2.kernel[...].astype(dtype), block.fc2.bias[...])


def losses(frames, tokens, dtype):
  """(kernel loss, XLA loss) of (x, the float32 parameters), x and the
  parameters: a weighted sum of the block's output, so every output value
  counts."""
  graph, params = nnx.split(xla_modules(dtype))
  x = jax.random.normal(jax.random.key(3), (frames, tokens, CHANNELS)).astype(dtype)
  probe = jax.random.normal(jax.random.key(4), x.shape)
  frames_per_clip = frames // len(SCALE)

  def kernel_loss(x, params):
    norm, block = nnx.merge(graph, params)
    out = mlp.fused_mlp(x, SCALE, as_weights(norm, block, dtype),
                        frames_per_clip, EPS)
    return (out.astype(jnp.float32) * probe).sum(), out

  def xla_loss(x, params):
    norm, block = nnx.merge(graph, params)
    per_frame = jnp.repeat(SCALE, frames_per_clip)[:, None, None]
    out = x + (per_frame * block(norm(x))).astype(dtype)
    return (out.astype(jnp.float32) * probe).sum(), out

  return kernel_loss, xla_loss, x, params


def values_and_grads(loss, x, params):
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                               has_aux=True))(x, params)
  grads = grads[0], nnx.to_pure_dict(grads[1])
  return [out.astype(jnp.float32)] + [g.astype(jnp.float32)
                                      for g in jax.tree.leaves(grads)]


def assert_close(got, want, relative):
  """Each array within `relative` x its largest magnitude."""
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=relative * float(np.abs(w).max()),
                               rtol=0)


def test_tiling_takes_whole_frames_and_splits_steps_over_two_cores():
  assert mlp.tiling(16, 300) == mlp.Tiling(16, 300, 2, 2)  # 3 frames > 1024 rows
  assert mlp.tiling(6, 13).frames_per_step == 6  # one step: one core
  assert mlp.tiling(6, 13).grid == (1, 1)
  assert mlp.tiling(7, 2000).grid == (1, 7)  # one frame a step, odd: one core


def test_float32_values_and_gradients_match_xla(monkeypatch):
  """16 frames (2 clips) of 13 tokens, 2 frames a step: 8 steps, 4 per
  core, so the weight gradients sum over steps and cores. Float32: equal to
  float32 rounding (2e-5 of the largest value)."""
  monkeypatch.setattr(mlp, 'TARGET_ROWS', 2 * 13)
  assert mlp.tiling(16, 13).grid == (2, 4)
  kernel_loss, xla_loss, x, params = losses(16, 13, jnp.float32)
  got = values_and_grads(kernel_loss, x, params)
  want = values_and_grads(xla_loss, x, params)
  assert_close(got, want, 2e-5)
  # The dropped clip's frames are their input, exactly.
  np.testing.assert_array_equal(got[0][8:], x[8:])


def test_bfloat16_values_and_gradients_match_xla():
  """bfloat16 activations and matmul operands, float32 accumulation: within
  3 % of the largest value of the float32 XLA path's result (bfloat16 keeps
  8 bits; XLA's own bfloat16 path is as far off)."""
  kernel_loss, _, x, params = losses(6, 13, jnp.bfloat16)
  reference_loss = losses(6, 13, jnp.float32)[1]
  want = values_and_grads(reference_loss, x.astype(jnp.float32), params)
  assert_close(values_and_grads(kernel_loss, x, params), want, 3e-2)


def test_erf_and_gelu_follow_xla():
  @jax.jit
  def ours_and_xlas(x):
    slope = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x)
    return ((common.erf(x), jax.lax.erf(x)),
            (common.gelu(x), jax.nn.gelu(x, approximate=False)),
            (common.gelu_derivative(x), slope))

  pairs = ours_and_xlas(jnp.linspace(-6, 6, 4001, dtype=jnp.float32))
  for (ours, xlas), tolerance in zip(pairs, (5e-7, 2e-6, 5e-7)):
    np.testing.assert_allclose(ours, xlas, atol=tolerance, rtol=0)


# ------------------------------------------------- costs and TPU lowering ---

def tpu_module_text(frames, tokens) -> str:
  """The value and gradient program of the kernel, lowered for a TPU here
  (no TPU, no libtpu: jax.export lowers the Mosaic kernels itself)."""
  struct = jax.ShapeDtypeStruct
  bf16, f32 = jnp.bfloat16, jnp.float32
  weights = mlp.MlpWeights(
      struct((CHANNELS,), f32), struct((CHANNELS,), f32),
      struct((CHANNELS, HIDDEN), bf16), struct((HIDDEN,), f32),
      struct((HIDDEN, CHANNELS), bf16), struct((CHANNELS,), f32))

  def step(x, scale, weights):
    return jax.value_and_grad(lambda x, w: mlp.fused_mlp(
        x, scale, w, frames // 2, EPS).astype(f32).sum(), argnums=(0, 1))(
            x, weights)

  exported = export.export(jax.jit(step), platforms=['tpu'])(
      struct((frames, tokens, CHANNELS), bf16), struct((2,), f32), weights)
  return exported.mlir_module()


def declared_costs(text: str) -> list[dict]:
  """The cost_estimate of every tpu_custom_call in a lowered module."""
  return [{key: int(value) for key, value in re.findall(r'\\22(\w+)\\22:(\d+)', c)}
          for c in re.findall(r'cost_estimate\\22: \{(.*?)\}', text)]


# Bytes of blocks in TPU memory, by hand: bfloat16 rows pad to 16, float32
# rows to 8, every row to 128 lanes.
ROW_F32 = 8 * 128 * 4  # a [1, n <= 128] float32 row: one tile
ONE_FRAME_13 = 16 * 128 * 2  # [13, 48] bfloat16
ONE_FRAME_300 = 304 * 128 * 2  # [300, 48] bfloat16
W1_BF16 = 48 * 128 * 2  # [48, 96]
W2_BF16 = 96 * 128 * 2  # [96, 48]
W1_F32, W2_F32 = 48 * 128 * 4, 96 * 128 * 4
# The matrix unit on padded operands: 2 x rows (to 8) x inner x cols (to 128).
MATMUL_13 = 2 * 16 * 128 * 128  # [13, 48 or 96] x [48 or 96, 96 or 48]


def test_declared_costs_of_one_step_by_hand():
  """6 frames of 13 tokens: one grid step on one core; every block fetched
  once. Forward: the scale (SMEM), x, the 6 parameters, the output; 2
  matmuls a frame. Backward: the scale, x, dout, 5 parameters, dx and 6
  float32 gradient sums; fc1 again and 4 products a frame (the weight
  gradients contract over the 13 tokens, padded to 128)."""
  forward, backward = declared_costs(tpu_module_text(6, 13))
  assert forward == {
      'flops': 6 * 2 * MATMUL_13, 'transcendentals': 6 * 13 * (96 + 1),
      'remote_bytes_transferred': 0,
      'bytes_accessed': (ROW_F32 + 6 * ONE_FRAME_13 + 4 * ROW_F32 + W1_BF16
                         + W2_BF16 + 6 * ONE_FRAME_13)}
  weight_grads = 2 * 96 * 128 * 128 + 2 * 48 * 128 * 128  # dW2, dW1
  assert backward == {
      'flops': 6 * (3 * MATMUL_13 + weight_grads),
      'transcendentals': 6 * 13 * (3 * 96 + 1), 'remote_bytes_transferred': 0,
      'bytes_accessed': (ROW_F32 + 2 * 6 * ONE_FRAME_13 + 3 * ROW_F32
                         + W1_BF16 + W2_BF16  # inputs
                         + 6 * ONE_FRAME_13 + 4 * ROW_F32 + W1_F32 + W2_F32)}


def test_declared_costs_count_every_fetch_of_a_multi_step_grid():
  """16 frames of 300 tokens, 2 frames a step, grid (2 cores, 4 steps):
  x, dout and the outputs move once per step; the parameters, the scale
  and the gradient sums once per core, each core running its own
  pipeline."""
  cost = mlp.forward_cost(mlp.tiling(16, 300), 2, CHANNELS, HIDDEN,
                          jnp.bfloat16)
  assert cost.bytes_accessed == (2 * ROW_F32 + 2 * 16 * ONE_FRAME_300
                                 + 2 * (4 * ROW_F32 + W1_BF16 + W2_BF16))
  assert cost.flops == 16 * 2 * (2 * 304 * 128 * 128)
  cost = mlp.backward_cost(mlp.tiling(16, 300), 2, CHANNELS, HIDDEN,
                           jnp.bfloat16)
  assert cost.bytes_accessed == (
      2 * ROW_F32 + 3 * 16 * ONE_FRAME_300
      + 2 * (3 * ROW_F32 + W1_BF16 + W2_BF16)  # parameters, per core
      + 2 * (4 * ROW_F32 + W1_F32 + W2_F32))  # gradient sums, per core


def test_pallas_is_refused_on_a_gpu():
  with pytest.raises(UserError, match=r"mlp_impl = 'pallas'.*GPU; use xla"):
    mlp.resolve_mlp_impl('pallas', 'gpu')
  assert [mlp.resolve_mlp_impl('auto', p) for p in ('tpu', 'gpu', 'cpu')] == [
      'pallas', 'xla', 'xla']


# ---------------------------------------------------------- in the model ---

def block_losses(impl):
  """Value and parameter gradients of tiny's last STA block (128 wide, no
  projection: the kernel's block) in training, drop path 0.5."""
  config = tiny.get_config()
  config.model.mlp_impl, config.model.drop_path = impl, 0.5
  spec = arch.block_specs(config.model)[-1]
  block = STABlock(spec, config.model, num_summary=1, dtype=jnp.float32,
                   rngs=nnx.Rngs(0))
  # 4 clips of 4 frames: a class token and 2x2 patches, pooled to 1x1.
  x = jax.random.normal(jax.random.key(5), (4, 4, 1 + 2 * 2, spec.dim))

  def loss(block):
    out = block.output_tokens(x, (2, 2))
    return (out * jnp.cos(out)).sum(), out

  (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(block)
  return block.mlp_impl, out, jax.tree.leaves(nnx.state(grads, nnx.Param))


@pytest.mark.ci_extra  # an STA block's gradients twice (~20 s)
def test_the_model_uses_the_kernel_in_its_narrow_blocks_with_the_same_numbers():
  """The drop path draws the same clips in both (one of the 4 dropped);
  outputs and gradients equal to float32 rounding."""
  impl, out, grads = block_losses('pallas')
  xla_impl, xla_out, xla_grads = block_losses('xla')
  assert (impl, xla_impl) == ('pallas', 'xla')
  np.testing.assert_allclose(out, xla_out, atol=1e-5, rtol=0)
  scale = max(float(np.abs(g).max()) for g in xla_grads)
  for got, want in zip(grads, xla_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


def test_the_model_flops_do_not_depend_on_mlp_impl(monkeypatch):
  """MFU's numerator: counted from the jaxpr, the kernel's form shows one
  grid step of its products (here one frame of 4), so the count is taken
  on the XLA form."""
  monkeypatch.setattr(mlp, 'TARGET_ROWS', 1)
  config = tiny.get_config()
  config.model.mlp_impl = 'pallas'
  kernel_form = flops.count_macs(*flops.model_forward(abstract_model(config),
                                                      config))
  config.model.mlp_impl = 'xla'
  xla_form = flops.model_macs(config)
  assert kernel_form < xla_form
  config.model.mlp_impl = 'pallas'
  assert flops.model_macs(config) == xla_form


@pytest.mark.ci_extra  # the tiny model's gradients twice (about a minute)
def test_tiny_stat_pallas_matches_xla():
  video = jax.random.normal(jax.random.key(3), (2, 8, 32, 32, 3))
  results = []
  for impl in ('pallas', 'xla'):
    config = tiny.get_config()
    config.model.mlp_impl = impl
    model = nnx.jit(lambda: build_model(config, nnx.Rngs(0)))()

    def loss(model):
      logits = model(video)
      return (logits * jnp.cos(logits)).sum(), logits

    grads, logits = nnx.jit(nnx.grad(loss, has_aux=True))(model)
    results.append((logits, jax.tree.leaves(nnx.state(grads, nnx.Param))))
  (logits, grads), (xla_logits, xla_grads) = results
  np.testing.assert_allclose(logits, xla_logits, atol=1e-5, rtol=0)
  scale = max(float(np.abs(g).max()) for g in xla_grads)
  for got, want in zip(grads, xla_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


SPLIT_CLIPS = '''
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stat_jax.kernels import mlp
mesh = Mesh(np.array(jax.devices()).reshape(2, 1), ('data', 'fsdp'))
clips, whole = NamedSharding(mesh, P(('data', 'fsdp'))), NamedSharding(mesh, P())
k = jax.random.split(jax.random.key(0), 8)
C, H = 16, 32
x = jax.device_put(jax.random.normal(k[0], (4, 2, 5, C)), clips)
scale = jax.device_put(jnp.array([1.25, 0.0, 1.25, 1.25]), clips)
w = mlp.MlpWeights(1 + 0.1 * jax.random.normal(k[1], (C,)), 0.1 * jax.random.normal(k[2], (C,)),
    jax.random.normal(k[3], (C, H)) / 4, 0.1 * jax.random.normal(k[4], (H,)), jax.random.normal(k[5], (H, C)) / 6, 0.1 * jax.random.normal(k[6], (C,)))
w = jax.device_put(w, whole)
def ref(x, scale, w):
  m = x.mean(-1, keepdims=True); v = ((x - m) ** 2).mean(-1, keepdims=True)
  xn = (x - m) / jnp.sqrt(v + 1e-6) * w.gamma + w.beta
  return x + scale[:, None, None, None] * (jax.nn.gelu(xn @ w.w1 + w.b1, approximate=False) @ w.w2 + w.b2)
def run(f):
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sin(f(x, scale, w)).sum(), argnums=(0, 1)))(x, w)
got = run(lambda x, s, w: mlp.fused_mlp_clips(x, s, w, 1e-6))
want = run(ref)
print(json.dumps([float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]))
'''


@pytest.mark.ci_extra  # a subprocess on 2 devices
def test_clips_split_over_devices_match_xla():
  """Under a mesh each device runs the kernels on its own clips (XLA
  cannot split a Mosaic kernel): same values and gradients as XLA's."""
  errors = run_on_cpu_devices(SPLIT_CLIPS, 2)
  assert max(errors) < 2e-5, errors


PER_DEVICE_GRADS = SPLIT_CLIPS.split('def run(f):')[0] + '''
rows = lambda a, n: jax.lax.with_sharding_constraint(
    a.reshape(n, a.shape[0] // n, *a.shape[1:]), clips)
def run(f, x, scale, n):
    def device(w, x, s):  # the train step's per-device gradients
        return jax.value_and_grad(lambda w, x: jnp.sin(f(x, s, w)).sum(),
                                  argnums=(0, 1))(w, x)
    step = jax.jit(lambda w, x, s: jax.vmap(device, in_axes=(None, 0, 0))(
        w, rows(x, n), rows(s, n)))
    return step(w, x, scale), step.lower(w, x, scale).compile().as_text()
errors = []
for clips_per_slice, n in ((1, 2), (2, 2), (1, 4)):
    xs, ss = x[:n * clips_per_slice], scale[:n * clips_per_slice]
    got, hlo = run(lambda x, s, w: mlp.fused_mlp_clips(x, s, w, 1e-6), xs, ss, n)
    want, _ = run(ref, xs, ss, n)
    errors.append([hlo.count('all-to-all')] + [float(jnp.abs(a - b).max())
                  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))])
print(json.dumps(errors))
'''


@pytest.mark.ci_extra  # a subprocess on 2 devices
def test_per_device_gradients_under_vmap_run_on_each_devices_own_clips():
  """The train step's vmap over devices of value_and_grad: with one slice
  per device the kernels run on each device's own clips (no all-to-all,
  1 clip per device included), with 4 slices on 2 devices they are
  batched as vmap does; both give XLA's values and gradients."""
  results = run_on_cpu_devices(PER_DEVICE_GRADS, 2)
  for all_to_alls, *errors in results[:2]:
    assert all_to_alls == 0
    assert max(errors) < 2e-5, errors
  assert max(results[2][1:]) < 2e-5, results[2]
