"""The transformer MLP with its LayerNorm and residual as one Pallas TPU
kernel: out = x + s * fc2(GELU(fc1(LN(x)))), s the drop-path scale of the
clip (0 or 1 / keep; 1 in eval).

For the narrow stages (96-384 channels) a matmul does fewer FLOPs per byte
than the chip needs, so unfused the step is bound by the [tokens, 4C]
hidden activations written and read back, and by the LayerNorm, GELU and
residual passes over the tokens. Here each grid step takes whole frames of
tokens, keeps the hidden activations in VMEM, and reads the weights once
per call (their block index never changes). The backward kernel recomputes
LN(x) and the hidden activations instead of saving them, and accumulates
the weight gradients over the frames in float32, one partial sum per
TensorCore.

Tokens come as [frames, tokens per frame, C]: merging the clip and frame
axes is free in the TPU layout, where merging the tokens into the rows
would be a copy (785 tokens per frame is no whole number of tiles).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from stat_jax.checks.errors import UserError
from stat_jax.kernels import common

# Rows (frames x tokens) a grid step aims for: enough to amortise the step's
# overhead, few enough that double-buffered blocks stay small next to VMEM.
TARGET_ROWS = 1024
MAX_FRAMES_PER_STEP = 16
# The kernels split the frames over this many TensorCores (v4 and v5p run
# two per chip as one device; one core runs both halves in turn), each with
# its own weight-gradient sums in the backward.
CORES = 2
# VMEM a kernel may ask for: its footprint with headroom, at least the
# default scoped limit, at most this.
VMEM_LIMIT = 64 * 2**20
MIN_VMEM_LIMIT = 32 * 2**20
F32 = jnp.float32
# model.mlp_impl: 'xla' leaves the MLP to XLA; 'pallas' runs these kernels
# (compiled on a TPU, interpreted on the CPU: slow, for tests); 'auto' is
# 'pallas' on TPUs, else 'xla'.
MLP_IMPLS = ('auto', 'xla', 'pallas')
# Widths the kernels take: the narrow stages. At 768 channels the weights'
# float32 gradient sums alone (2 x 768 x 3072, double-buffered) pass VMEM,
# and the matmuls are compute bound in XLA already.
MAX_WIDTH = 384
# dot_general dimension numbers: A B, A^T B and A B^T.
NN = (((1,), (0,)), ((), ()))
TN = (((0,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))


def resolve_mlp_impl(impl: str, platform: str | None = None) -> str:
  """'xla' or 'pallas' for MLP_IMPLS `impl` on `platform` (default: the
  default backend's); 'pallas' is refused on a GPU, where Pallas TPU
  kernels do not lower."""
  platform = platform or jax.default_backend()
  if impl == 'pallas' and platform == 'gpu':
    raise UserError("config.model.mlp_impl = 'pallas': its kernels are Pallas "
                    'TPU kernels, which do not lower on a GPU; use xla there')
  if impl != 'auto':
    return impl
  return 'pallas' if platform == 'tpu' else 'xla'


class MlpWeights(NamedTuple):
  """LayerNorm scale and bias [C] and the two linear layers; the matrices
  [C, H], [H, C] in the compute dtype, the vectors float32."""
  gamma: jax.Array
  beta: jax.Array
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array
  b2: jax.Array


class Tiling(NamedTuple):
  """How the kernels walk the frames: `frames_per_step` frames per grid
  step, the steps split over `cores` (grid axis 0, parallel)."""
  frames: int
  tokens: int
  frames_per_step: int
  cores: int

  @property
  def steps(self) -> int:
    return self.frames // self.frames_per_step

  @property
  def grid(self) -> tuple[int, int]:
    return self.cores, self.steps // self.cores


def tiling(frames: int, tokens: int) -> Tiling:
  """The largest divisor of `frames` whose frames hold at most TARGET_ROWS
  tokens (one frame at least), so no block runs past the array; two cores
  where the steps split evenly."""
  fitting = max(1, min(MAX_FRAMES_PER_STEP, TARGET_ROWS // tokens))
  per_step = max(d for d in range(1, fitting + 1) if frames % d == 0)
  steps = frames // per_step
  return Tiling(frames, tokens, per_step, CORES if steps % CORES == 0 else 1)


def _row(vector_ref):
  """A [1, n] float32 parameter row."""
  return vector_ref[...].astype(F32)


def _normalize(x, eps: float):
  """(x - mean) / std over the channels, and 1 / std: [L, C], [L, 1]."""
  centered = x - jnp.mean(x, axis=-1, keepdims=True)
  rstd = lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + eps)
  return centered * rstd, rstd


def _hidden(xn, w1_ref, b1_ref):
  """fc1(LN(x)) in float32, [L, H]."""
  w1 = w1_ref[...]
  return lax.dot_general(xn.astype(w1.dtype), w1, NN,
                         preferred_element_type=F32) + _row(b1_ref)


def _clip_scale(scale_ref, frame, frames_per_clip: int):
  """The drop-path scale of `frame`'s clip (lax.div: jnp's floor division
  lowers through sign, which Mosaic lowers only knowing the chip)."""
  return scale_ref[lax.div(frame, frames_per_clip)]


def _first_frame(block_frames: int):
  """The index of the first frame of this grid step's block."""
  step = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
  return step * block_frames


def _forward_kernel(scale_ref, x_ref, gamma_ref, beta_ref, w1_ref, b1_ref,
                    w2_ref, b2_ref, out_ref, *, eps, frames_per_clip):
  first = _first_frame(x_ref.shape[0])

  def frame(f, carry):
    x = x_ref[f].astype(F32)  # [L, C]
    xhat, _ = _normalize(x, eps)
    hidden = common.gelu(_hidden(xhat * _row(gamma_ref) + _row(beta_ref),
                                 w1_ref, b1_ref))  # [L, H]
    w2 = w2_ref[...]
    y = lax.dot_general(hidden.astype(w2.dtype), w2, NN,
                        preferred_element_type=F32) + _row(b2_ref)
    scale = _clip_scale(scale_ref, first + f, frames_per_clip)
    out_ref[f] = (x + scale * y).astype(out_ref.dtype)
    return carry

  lax.fori_loop(0, x_ref.shape[0], frame, 0)


def _backward_kernel(scale_ref, x_ref, dout_ref, gamma_ref, beta_ref, w1_ref,
                     b1_ref, w2_ref, dx_ref, dgamma_ref, dbeta_ref, dw1_ref,
                     db1_ref, dw2_ref, db2_ref, *, eps, frames_per_clip):
  first = _first_frame(x_ref.shape[0])
  sums = (dgamma_ref, dbeta_ref, dw1_ref, db1_ref, dw2_ref, db2_ref)

  @pl.when(pl.program_id(1) == 0)
  def _():
    for ref in sums:
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  def frame(f, carry):
    x = x_ref[f].astype(F32)
    dout = dout_ref[f].astype(F32)  # [L, C]
    xhat, rstd = _normalize(x, eps)
    gamma = _row(gamma_ref)
    xn = xhat * gamma + _row(beta_ref)
    pre = _hidden(xn, w1_ref, b1_ref)  # [L, H]
    w1, w2 = w1_ref[...], w2_ref[...]
    scale = _clip_scale(scale_ref, first + f, frames_per_clip)
    dy = (scale * dout).astype(w2.dtype)
    dw2_ref[...] += lax.dot_general(common.gelu(pre).astype(w2.dtype), dy, TN,
                                    preferred_element_type=F32)
    db2_ref[...] += jnp.sum(dy.astype(F32), axis=0, keepdims=True)
    dpre = (lax.dot_general(dy, w2, NT, preferred_element_type=F32)
            * common.gelu_derivative(pre)).astype(w1.dtype)  # [L, H]
    dw1_ref[...] += lax.dot_general(xn.astype(w1.dtype), dpre, TN,
                                    preferred_element_type=F32)
    db1_ref[...] += jnp.sum(dpre.astype(F32), axis=0, keepdims=True)
    dxn = lax.dot_general(dpre, w1, NT, preferred_element_type=F32)  # [L, C]
    dgamma_ref[...] += jnp.sum(dxn * xhat, axis=0, keepdims=True)
    dbeta_ref[...] += jnp.sum(dxn, axis=0, keepdims=True)
    dxhat = dxn * gamma
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
                 - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
    dx_ref[f] = (dout + dx).astype(dx_ref.dtype)
    return carry

  lax.fori_loop(0, x_ref.shape[0], frame, 0)


# ------------------------------------------------------------ block specs ---

def _frames_spec(tile: Tiling, channels: int) -> pl.BlockSpec:
  """Blocks of whole frames [frames_per_step, L, channels]."""
  per_core = tile.grid[1]
  return pl.BlockSpec((tile.frames_per_step, tile.tokens, channels),
                      lambda c, j: (c * per_core + j, 0, 0))


def _whole_spec(shape) -> pl.BlockSpec:
  """The whole array at every step (fetched once per core: its index
  never changes)."""
  return pl.BlockSpec(shape, lambda c, j: (0,) * len(shape))


def _per_core_spec(shape) -> pl.BlockSpec:
  """One core's partial sum of a [cores, *shape] output."""
  return pl.BlockSpec((None, *shape), lambda c, j: (c,) + (0,) * len(shape))


def _scale_spec() -> pl.BlockSpec:
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def _parameter_shapes(channels: int, hidden: int):
  """Shapes of gamma, beta, w1, b1, w2, b2 as the kernels see them."""
  return ((1, channels), (1, channels), (channels, hidden), (1, hidden),
          (hidden, channels), (1, channels))


def _vmem_limit(footprint: int) -> int:
  if footprint > VMEM_LIMIT:
    raise ValueError(f'fused MLP: {footprint / 2**20:.0f} MiB of VMEM needed '
                     f'(more than {VMEM_LIMIT / 2**20:.0f}); use '
                     "model.mlp_impl='xla' for this width")
  return max(MIN_VMEM_LIMIT, footprint * 3 // 2)


def _footprint(tile: Tiling, channels: int, hidden: int, dtype,
               backward: bool) -> int:
  """VMEM bytes: every block double-buffered, plus one frame's float32
  temporaries ([L, H]: 2 forward, 4 backward)."""
  weights = 2 * common.padded_bytes((channels, hidden), dtype)
  frames = common.padded_bytes((tile.frames_per_step, tile.tokens, channels),
                               dtype)
  temporaries = common.padded_bytes((tile.tokens, hidden), F32)
  if backward:
    sums = 2 * common.padded_bytes((channels, hidden), F32)
    return 2 * (weights + 3 * frames + sums) + 4 * temporaries
  return 2 * (weights + 2 * frames) + 2 * temporaries


# ------------------------------------------------------------------ costs ---

def _padded_matmul_flops(rows: int, inner: int, cols: int) -> int:
  """2 x rows x inner x cols with rows padded to 8 and inner, cols to the
  128 lanes: what the matrix unit computes, zero padding included."""
  lanes = lambda n: -(-n // common.LANES) * common.LANES
  return 2 * (-(-rows // 8) * 8) * lanes(inner) * lanes(cols)


def _bytes_moved(tile: Tiling, specs_and_arrays) -> int:
  """Bytes the pipelines copy between HBM and VMEM: each block, padded to
  whole tiles, as often as its index changes over a core's part of the
  grid (each core runs its own pipeline); an SMEM array once per core."""
  cores, per_core = tile.grid
  total = 0
  for spec, (shape, dtype) in specs_and_arrays:
    if spec.block_shape is None:  # a whole array in SMEM
      total += cores * common.padded_bytes(shape, dtype)
      continue
    block = [d for d in spec.block_shape if d is not None]
    fetches = sum(common.block_fetches(
        (per_core,), lambda j, c=c: spec.index_map(c, j))
                  for c in range(cores))
    total += fetches * common.padded_bytes(block, dtype)
  return total


def forward_cost(tile: Tiling, clips: int, channels: int, hidden: int,
                 dtype) -> pl.CostEstimate:
  """What the forward kernel computes and moves (module doc of common)."""
  specs, arrays = _forward_specs(tile, channels, hidden, dtype, clips)
  rows = tile.steps * tile.frames_per_step
  frame_flops = (_padded_matmul_flops(tile.tokens, channels, hidden)
                 + _padded_matmul_flops(tile.tokens, hidden, channels))
  return common.cost_estimate(
      flops=rows * frame_flops,
      # One division (erf) per hidden value, one rsqrt per token.
      transcendentals=rows * tile.tokens * (hidden + 1),
      bytes_accessed=_bytes_moved(tile, zip(specs, arrays)))


def backward_cost(tile: Tiling, clips: int, channels: int, hidden: int,
                  dtype) -> pl.CostEstimate:
  """What the backward kernel computes and moves: fc1 again, then the four
  products of the gradients (dW2, d hidden, dW1, d LN(x))."""
  specs, arrays = _backward_specs(tile, channels, hidden, dtype, clips)
  rows = tile.steps * tile.frames_per_step
  products = (
      2 * _padded_matmul_flops(tile.tokens, channels, hidden)  # fc1, d hidden
      + _padded_matmul_flops(hidden, tile.tokens, channels)  # dW2
      + _padded_matmul_flops(channels, tile.tokens, hidden)  # dW1
      + _padded_matmul_flops(tile.tokens, hidden, channels))  # d LN(x)
  return common.cost_estimate(
      flops=rows * products,
      # erf's division twice (GELU and its derivative) and an exp per
      # hidden value, one rsqrt per token.
      transcendentals=rows * tile.tokens * (3 * hidden + 1),
      bytes_accessed=_bytes_moved(tile, zip(specs, arrays)))


def _forward_specs(tile: Tiling, channels: int, hidden: int, dtype, clips):
  """(in specs + out spec, the (shape, dtype) each one carries)."""
  params = _parameter_shapes(channels, hidden)
  param_dtypes = (F32, F32, dtype, F32, dtype, F32)
  frames = (tile.frames, tile.tokens, channels)
  specs = [_scale_spec(), _frames_spec(tile, channels),
           *(_whole_spec(s) for s in params), _frames_spec(tile, channels)]
  arrays = [((clips,), F32), (frames, dtype), *zip(params, param_dtypes),
            (frames, dtype)]
  return specs, arrays


def _backward_specs(tile: Tiling, channels: int, hidden: int, dtype, clips):
  """(in specs + out specs, the (shape, dtype) each one carries)."""
  params = _parameter_shapes(channels, hidden)
  frames = (tile.frames, tile.tokens, channels)
  inputs = [_scale_spec(), _frames_spec(tile, channels),
            _frames_spec(tile, channels), *(_whole_spec(s) for s in params[:5])]
  input_arrays = [((clips,), F32), (frames, dtype), (frames, dtype),
                  *zip(params[:5], (F32, F32, dtype, F32, dtype))]
  outputs = [_frames_spec(tile, channels),
             *(_per_core_spec(s) for s in params)]
  output_arrays = [(frames, dtype), *((s, F32) for s in params)]
  return inputs + outputs, input_arrays + output_arrays


# ---------------------------------------------------------------- kernels ---

def _pallas(kernel, tile: Tiling, in_specs, out_specs, out_shape, *,
            vmem_bytes: int, cost: pl.CostEstimate, name: str):
  """The pallas_call of one of the kernels over the frames (module doc)."""
  return common.tpu_or_interpreted(lambda interpret: pl.pallas_call(
      kernel, grid=tile.grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, cost_estimate=cost, name=name, interpret=interpret,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'arbitrary'),
          vmem_limit_bytes=_vmem_limit(vmem_bytes))))


def _forward(x, scale, weights: MlpWeights, *, frames_per_clip: int,
             eps: float):
  frames, tokens, channels = x.shape
  hidden, clips = weights.w1.shape[1], scale.shape[0]
  tile = tiling(frames, tokens)
  specs, _ = _forward_specs(tile, channels, hidden, x.dtype, clips)
  kernel = functools.partial(_forward_kernel, eps=eps,
                             frames_per_clip=frames_per_clip)
  return _pallas(
      kernel, tile, specs[:-1], specs[-1],
      jax.ShapeDtypeStruct(x.shape, x.dtype),
      vmem_bytes=_footprint(tile, channels, hidden, x.dtype, backward=False),
      cost=forward_cost(tile, clips, channels, hidden, x.dtype),
      name='fused_mlp_forward')(scale, x, *_as_rows(weights))


def _backward(x, dout, scale, weights: MlpWeights, *, frames_per_clip: int,
              eps: float):
  """(dx, the float32 sums [cores, ...] of the gradients of gamma, beta, w1,
  b1, w2, b2 that each TensorCore's frames give)."""
  frames, tokens, channels = x.shape
  hidden, clips = weights.w1.shape[1], scale.shape[0]
  tile = tiling(frames, tokens)
  specs, arrays = _backward_specs(tile, channels, hidden, x.dtype, clips)
  inputs = 3 + 5  # scale, x, dout and gamma, beta, w1, b1, w2
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)] + [
      jax.ShapeDtypeStruct((tile.cores, *shape), dtype)
      for shape, dtype in arrays[inputs + 1:]]
  kernel = functools.partial(_backward_kernel, eps=eps,
                             frames_per_clip=frames_per_clip)
  dx, *sums = _pallas(
      kernel, tile, specs[:inputs], specs[inputs:], out_shape,
      vmem_bytes=_footprint(tile, channels, hidden, x.dtype, backward=True),
      cost=backward_cost(tile, clips, channels, hidden, x.dtype),
      name='fused_mlp_backward')(scale, x, dout, *_as_rows(weights)[:5])
  return dx, sums


def _as_rows(weights: MlpWeights):
  """The vectors as [1, n] rows (a lane-dense tile row), the matrices as is."""
  return [w.reshape(1, -1) if w.ndim == 1 else w for w in weights]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fused_mlp(x, scale, weights: MlpWeights, frames_per_clip: int,
              eps: float):
  """x + scale[clip] * fc2(GELU(fc1(LN(x)))), per frame; under a mesh each
  device on its own clips.

  x: [frames, tokens, C] in the compute dtype (clip-major: frame f is of
  clip f // frames_per_clip); scale: [clips] float32, the drop-path scale
  of each clip (no gradient flows to it); weights: MlpWeights with fc2 back
  to C channels; LN's epsilon `eps`.
  """
  return _forward_on_own_clips(x, scale, weights, frames_per_clip, eps)


def _forward_on_own_clips(x, scale, weights, frames_per_clip, eps):
  forward = functools.partial(_forward, frames_per_clip=frames_per_clip,
                              eps=eps)
  return common.on_own_clips(forward, clip_args=2)(x, scale, weights)


def _fused_mlp_forward(x, scale, weights, frames_per_clip, eps):
  out = _forward_on_own_clips(x, scale, weights, frames_per_clip, eps)
  return out, (x, scale, weights)


def _fused_mlp_backward(frames_per_clip, eps, saved, dout):
  x, scale, weights = saved
  backward = functools.partial(_backward, frames_per_clip=frames_per_clip,
                               eps=eps)
  # sums: [devices x cores, ...], each device's TensorCores' partial sums
  dx, sums = common.on_own_clips(backward, clip_args=3)(x, dout, scale,
                                                        weights)
  grads = [total.sum(axis=0).reshape(param.shape).astype(param.dtype)
           for total, param in zip(sums, weights)]
  return dx, jnp.zeros_like(scale), MlpWeights(*grads)


fused_mlp.defvjp(_fused_mlp_forward, _fused_mlp_backward)


def fused_mlp_clips(x, scale, weights: MlpWeights, eps: float):
  """fused_mlp of x: [B, nt, tokens, C] (scale: [B])."""
  batch, nt, tokens, channels = x.shape
  out = fused_mlp(x.reshape(batch * nt, tokens, channels), scale, weights,
                  nt, eps)
  return out.reshape(x.shape)
