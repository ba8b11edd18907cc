"""What the Pallas kernels share: the bytes a block occupies in TPU memory,
how often a grid fetches it, and the pl.CostEstimate they declare.

A kernel without a CostEstimate leaves the compiled program's
cost_analysis without FLOPs, bytes or optimal_seconds, so every kernel
declares one, counted the way the TPU moves data: a block's last two
dimensions are padded to whole (sublane, lane) tiles, and a block is copied
again whenever its index changes from one grid step to the next.
"""

import itertools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
import numpy as np
from jax.experimental import pallas as pl

LANES = 128
# A tile holds 8 rows of 32-bit values; narrower dtypes pack more rows.
SUBLANE_BYTES = 8 * 4


def padded_bytes(shape, dtype) -> int:
  """Bytes an array or block of `shape` and `dtype` occupies in TPU memory:
  the last dimension rounded up to 128 lanes, the one before it to the rows
  of a tile (8 for 32-bit, 16 for 16-bit values)."""
  itemsize = np.dtype(dtype).itemsize
  rows_per_tile = SUBLANE_BYTES // itemsize
  *lead, rows, cols = (1, 1, *shape)[-max(len(shape), 2):]
  rows = -(-rows // rows_per_tile) * rows_per_tile
  cols = -(-cols // LANES) * LANES
  return math.prod(lead) * rows * cols * itemsize


def block_fetches(grid, index_map, *scalars) -> int:
  """How many times a block with `index_map` is copied over `grid`,
  walking the grid in order (last axis fastest): once at the first step and
  again at every step whose block index differs from the step before.
  `scalars`: the scalar-prefetch arrays the index map reads."""
  fetches, previous = 0, None
  for step in itertools.product(*(range(n) for n in grid)):
    index = tuple(int(i) for i in index_map(*step, *scalars))
    fetches += index != previous
    previous = index
  return fetches


def cost_estimate(*, flops, transcendentals, bytes_accessed) -> pl.CostEstimate:
  """pl.CostEstimate from counts that may be numpy or Python numbers."""
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=int(bytes_accessed))


# XLA's float32 erf (and Eigen's): x P(x^2) / Q(x^2) on x clamped to [-4, 4],
# where erf is 1 to float32 precision. Mosaic has no erf (jax lowers it
# through erfc), so the kernels evaluate the same rational function.
ERF_NUMERATOR = (-2.72614225801306e-10, 2.77068142495902e-08,
                 -2.10102402082508e-06, -5.69250639462346e-05,
                 -7.34990630326855e-04, -2.95459980854025e-03,
                 -1.60960333262415e-02)
SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)
ERF_DENOMINATOR = (-1.45660718464996e-05, -2.13374055278905e-04,
                   -1.68282697438203e-03, -7.37332916720468e-03,
                   -1.42647390514189e-02)


def _polynomial(x, coefficients):
  """Horner's rule, highest power first."""
  result = coefficients[0]
  for c in coefficients[1:]:
    result = result * x + c
  return result


def erf(x):
  """erf of a float32 array, as XLA computes it (within float32 rounding)."""
  x = jnp.clip(x, -4.0, 4.0)
  squared = x * x
  return (x * _polynomial(squared, ERF_NUMERATOR)
          / _polynomial(squared, ERF_DENOMINATOR))


def gelu(x):
  """The exact (erf) GELU, x Phi(x), of a float32 array."""
  return 0.5 * x * (1.0 + erf(x * SQRT_HALF))


def gelu_derivative(x):
  """d gelu / dx = Phi(x) + x phi(x), phi the standard normal density."""
  return (0.5 * (1.0 + erf(x * SQRT_HALF))
          + x * jnp.exp(-0.5 * x * x) * INV_SQRT_2PI)



def tpu_or_interpreted(call):
  """The kernel `call(interpret)` returns, as a Mosaic kernel where the
  program is lowered for a TPU and run by Pallas's interpreter where it is
  lowered for the CPU (tests); the platform is the lowering's, so a TPU
  program compiled ahead of time on a CPU host gets the Mosaic kernel."""
  return lambda *args: jax.lax.platform_dependent(
      *args, tpu=call(False), cpu=call(True))


def on_own_clips(fn, clip_args: int):
  """fn(*args) with each device of the mesh its first argument is laid out
  on running fn on its own clips: the first `clip_args` arguments split
  along axis 0 over every mesh axis (as stat_jax/sharding.py splits a
  batch), the rest whole; each of fn's results split along axis 0 like
  them (r rows from each device: devices x r rows). XLA cannot split a
  Mosaic kernel over devices itself. Clips that do not split evenly go to
  fn whole: custom_vmap traces fn on one slice's clips (below), and
  outside a vmap XLA refuses such a Mosaic call. Call it inside a
  custom_vjp's rules, not around one: a custom vmap rule cannot be
  differentiated.

  Under a vmap over as many slices as the mesh has devices, the clip
  arguments batched (or the same in every slice) and the rest not (the
  train step's per-device gradients, slice i the clips of device i), the
  slices are folded into the clips: each device runs fn on its own slice.
  A shard_map under vmap would split every slice over all the devices
  instead, moving each into place and back through all-to-alls."""
  def call(*args):
    mesh = jax.typeof(args[0]).sharding.mesh
    if mesh.empty or mesh.size == 1:
      return fn(*args)
    clips = PartitionSpec(mesh.axis_names)
    specs = (clips,) * clip_args + (PartitionSpec(),) * (len(args) - clip_args)
    per_device = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=clips,
                               check_vma=False)

    def split_if_even(*args):
      rows = {leaf.shape[0] for arg in args[:clip_args]
              for leaf in jax.tree.leaves(arg)}
      return (fn if any(n % mesh.size for n in rows) else per_device)(*args)

    folding = jax.custom_batching.custom_vmap(split_if_even)

    @folding.def_vmap
    def rule(axis_size, in_batched, *args):
      whole_batched = any(jax.tree.leaves(in_batched[clip_args:]))
      if axis_size != mesh.size or whole_batched:
        in_axes = jax.tree.map(lambda batched: 0 if batched else None,
                               tuple(in_batched))
        out = jax.vmap(split_if_even, in_axes=in_axes)(*args)
      else:
        out = _folded(per_device, axis_size, clip_args, args, in_batched)
      return out, jax.tree.map(lambda _: True, out)
    return folding(*args)
  return call


def _folded(fn, slices: int, clip_args: int, args, in_batched):
  """fn on the slices of the clip arguments as one batch of clips:
  [slices, b, ...] -> [slices b, ...] in (an unbatched one the same in
  every slice), [slices r, ...] -> [slices, r, ...] out."""
  def fold(x, batched):
    x = x if batched else jnp.broadcast_to(x, (slices, *x.shape))
    return x.reshape(-1, *x.shape[2:])
  out = fn(*[jax.tree.map(fold, arg, batched) if index < clip_args else arg
             for index, (arg, batched) in enumerate(zip(args, in_batched))])
  return jax.tree.map(lambda x: x.reshape(slices, -1, *x.shape[1:]), out)
