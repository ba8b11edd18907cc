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
