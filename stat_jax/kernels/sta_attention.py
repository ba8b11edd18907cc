"""Shrinking Temporal Attention, equations (7)-(8), as fused Pallas kernels.

One grid step (clip b, head h, frame i, query tile t) puts a tile of frame
i's queries against every key of K̂_i at once:
  K_CA_i  the frame's pooled keys, read where the pooling wrote them, their
          leading `skip` class-token keys masked out (a class token is a
          key only through K_LA, equation (7));
  K_SA    of the window's frames: head h's K_SA of the whole clip stays in
          VMEM while the grid walks its frames, and the window table
          (scalar prefetch, in SMEM) picks frame i's neighbours;
  K_LA    the clip's class-token keys.
No K̂_i is gathered or concatenated in HBM and no logits leave the chip:
the few hundred keys of a frame fit in VMEM, so the softmax is one pass,
in float32.

The backward kernel recomputes the logits and their softmax instead of
saving a log-sum-exp: it needs the logits anyway, and the row max and sum
cost no HBM traffic, where a saved log-sum-exp would be written and read
back. It reduces the K_SA and K_LA gradients over the frames that share
them in VMEM (those grid axes run in order).

Every pallas_call runs as a Mosaic kernel on a TPU and in interpret mode
on the CPU (tests).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from stat_jax.kernels.common import (cost_estimate, on_own_clips,
                                     padded_bytes, tpu_or_interpreted)

# Query rows a tile holds at most; a frame with more is cut into equal
# tiles (rows rounded up to 8, the last tile padded).
MAX_BLOCK_Q = 1024


@dataclasses.dataclass(frozen=True)
class Layout:
  """The static part of a call: skip: leading keys of K_CA_i masked out;
  window: [nt * slots] neighbour frames of each frame, -1 outside the
  clip; slots: to - 1 (0 without SA); long_term: whether K_LA is given;
  block_q: query rows per tile."""
  skip: int
  window: tuple[int, ...]
  slots: int
  long_term: bool
  block_q: int


def block_rows(nq: int) -> int:
  """Query rows per tile for frames of `nq` queries."""
  if nq <= MAX_BLOCK_Q:
    return nq
  tiles = -(-nq // MAX_BLOCK_Q)
  rows = -(-nq // tiles)
  return -(-rows // 8) * 8


def make_layout(nq: int, skip: int, window_index: np.ndarray,
                window_valid: np.ndarray, long_term: bool) -> Layout:
  """Layout from the window table of attention.window_table ([nt, to-1]
  index and valid; to-1 = 0 without SA)."""
  table = np.where(window_valid, window_index, -1).astype(np.int32)
  return Layout(skip=skip, window=tuple(table.ravel().tolist()),
                slots=table.shape[1], long_term=long_term,
                block_q=block_rows(nq))


def sta_attention(q, k, v, k_sa, v_sa, k_la, v_la, layout: Layout):
  """Equations (7)-(8) for a batch of clips.

  Args:
    q: [B, nt, h, nq, d] queries.
    k, v: [B, nt, h, nk, d] K_CA_i / V_CA_i, the first layout.skip of them
      masked.
    k_sa, v_sa: [B, nt, h, n_sa, d] short-term keys/values (unused when
      layout.slots is 0).
    k_la, v_la: [B, h, n_la, d] long-term keys/values (unused unless
      layout.long_term).
  Returns:
    [B, nt, h, nq, d] in q's dtype.
  """
  arrays = (q, k, v, *((k_sa, v_sa) if layout.slots else ()),
            *((k_la, v_la) if layout.long_term else ()))
  return _attention(layout, *arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(layout, *arrays):
  return _on_own_clips(_forward, layout, arrays)


def _attention_fwd(layout, *arrays):
  return _on_own_clips(_forward, layout, arrays), arrays


def _attention_bwd(layout, arrays, dout):
  dq, *dkeys = _on_own_clips(_backward, layout, (*arrays, dout))
  return (dq, *[g.astype(x.dtype) for g, x in zip(dkeys, arrays[1:])])


_attention.defvjp(_attention_fwd, _attention_bwd)


def _on_own_clips(kernel, layout: Layout, arrays):
  """kernel(layout, window table, *arrays), every array [B, ...] of clips;
  under a mesh each device on its own clips (common.on_own_clips)."""
  return on_own_clips(
      lambda *clips: kernel(layout, _window_array(layout), *clips),
      clip_args=len(arrays))(*arrays)


def grid_and_specs(layout: Layout, q_shape, k_shape, sa_shape, la_shape):
  """The grid and BlockSpecs the kernels share: (grid, q_spec, kv_spec,
  sa_spec or None, la_spec or None). Shapes as in sta_attention (None for
  an absent set). The grid runs (clip, head, frame, query tile): K_SA and
  K_LA blocks keep their index over a clip's frames, so each is copied
  once per (clip, head)."""
  batch, nt, heads, nq, head_dim = q_shape
  grid = (batch, heads, nt, pl.cdiv(nq, layout.block_q))
  q_spec = pl.BlockSpec((None, None, None, layout.block_q, head_dim),
                        lambda b, h, i, t, window: (b, i, h, t, 0))
  kv_spec = pl.BlockSpec((None, None, None, k_shape[3], head_dim),
                         lambda b, h, i, t, window: (b, i, h, 0, 0))
  sa_spec = la_spec = None
  if sa_shape is not None:
    sa_spec = pl.BlockSpec((None, nt, None, sa_shape[3], head_dim),
                           lambda b, h, i, t, window: (b, 0, h, 0, 0))
  if la_shape is not None:
    la_spec = pl.BlockSpec((None, None, la_shape[2], head_dim),
                           lambda b, h, i, t, window: (b, h, 0, 0))
  return grid, q_spec, kv_spec, sa_spec, la_spec


def _window_array(layout: Layout):
  # Scalar prefetch needs at least one element.
  return jnp.asarray(layout.window or (0,), jnp.int32)


def _key_sources(window_ref, frame, ca, sa, la, layout: Layout, rows: int):
  """Frame `frame`'s key sets as [(k_ref, v_ref, index, mask)]: read a set
  as k_ref[index]; mask (broadcast to [rows, n]) is False on keys outside
  K̂_i, None where all count. `ca`, `sa`, `la`: (k_ref, v_ref) pairs, the
  last two None when absent; the same call with gradient refs gives where
  each set's gradients go."""
  mask = None
  if layout.skip:
    n_ca = ca[0].shape[0]
    mask = jax.lax.broadcasted_iota(jnp.int32, (rows, n_ca), 1) >= layout.skip
  sources = [(*ca, (...,), mask)]
  for slot in range(layout.slots):
    neighbour = window_ref[frame * layout.slots + slot]
    sources.append((*sa, (jnp.maximum(neighbour, 0),), neighbour >= 0))
  if la is not None:
    sources.append((*la, (...,), None))
  return sources


def _logits(q, keys, mask, scale):
  """[rows, n] float32 scaled logits, -inf where mask is False."""
  logits = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32) * scale
  return logits if mask is None else jnp.where(mask, logits, -jnp.inf)


def _exp_and_total(logits):
  """exp(logits - row max) of each set, and their row sum [rows, 1]."""
  peak = functools.reduce(jnp.maximum,
                          [s.max(axis=1, keepdims=True) for s in logits])
  weights = [jnp.exp(s - peak) for s in logits]
  return weights, sum(w.sum(axis=1, keepdims=True) for w in weights)


def _split_refs(refs, layout: Layout):
  """(q, k, v) refs (or arrays, or their gradients), then the (k_sa, v_sa)
  pair or None, the (k_la, v_la) pair or None (present as the layout has
  window slots and long-term keys), and the remaining refs."""
  q_ref, k_ref, v_ref, *rest = refs
  sa = (rest.pop(0), rest.pop(0)) if layout.slots else None
  la = (rest.pop(0), rest.pop(0)) if layout.long_term else None
  return (q_ref, k_ref, v_ref), sa, la, rest


def _forward_kernel(window_ref, *refs, layout, scale):
  (q_ref, k_ref, v_ref), sa, la, (o_ref,) = _split_refs(refs, layout)
  q = q_ref[...]  # [block_q, d]
  sources = _key_sources(window_ref, pl.program_id(2), (k_ref, v_ref), sa,
                         la, layout, q.shape[0])
  logits = [_logits(q, k[index], mask, scale) for k, _, index, mask in sources]
  weights, total = _exp_and_total(logits)
  out = sum(jnp.dot(w.astype(v.dtype), v[index],
                    preferred_element_type=jnp.float32)
            for w, (_, v, index, _) in zip(weights, sources))
  o_ref[...] = (out / total).astype(o_ref.dtype)


def _pallas(kernel, *, grid, in_specs, out_specs, out_shape, dims, cost,
            name):
  """pl.pallas_call with the window table as scalar prefetch, a Mosaic
  kernel on a TPU and interpreted on the CPU (common.tpu_or_interpreted;
  a GPU would need Triton or Mosaic GPU kernels)."""
  return tpu_or_interpreted(lambda interpret: pl.pallas_call(
      kernel, out_shape=out_shape, name=name, interpret=interpret,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
          out_specs=out_specs),
      compiler_params=pltpu.CompilerParams(dimension_semantics=dims),
      cost_estimate=cost))


def _forward(layout, window, *arrays):
  """The forward kernel on the window table and the flat arrays of
  _attention -> out."""
  (q, k, v), sa, la, _ = _split_refs(arrays, layout)
  grid, q_spec, kv_spec, sa_spec, la_spec = grid_and_specs(
      layout, q.shape, k.shape, _shape(sa), _shape(la))
  kernel = functools.partial(
      _forward_kernel, layout=layout, scale=1 / math.sqrt(q.shape[-1]))
  return _pallas(
      kernel, grid=grid, name='sta_attention_forward',
      in_specs=[q_spec, *_key_specs(kv_spec, sa_spec, la_spec)],
      out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      dims=('parallel',) * 4,
      cost=forward_cost(layout, q, k, v, sa, la))(window, *arrays)


def _key_specs(kv_spec, sa_spec, la_spec):
  """The BlockSpecs of k, v and the present K_SA / K_LA pairs."""
  return [kv_spec, kv_spec, *[spec for spec in (sa_spec, la_spec)
                              if spec is not None for _ in range(2)]]


def _backward_kernel(window_ref, *refs, layout, scale, nq):
  (q_ref, k_ref, v_ref), sa, la, (do_ref, *grads) = _split_refs(refs, layout)
  (dq_ref, dk_ref, dv_ref), dsa, dla, _ = _split_refs(grads, layout)
  frame, tile = pl.program_id(2), pl.program_id(3)

  @pl.when(tile == 0)
  def _():
    dk_ref[...] = jnp.zeros_like(dk_ref)
    dv_ref[...] = jnp.zeros_like(dv_ref)

  @pl.when((frame == 0) & (tile == 0))
  def _():
    for ref in (*(dsa or ()), *(dla or ())):
      ref[...] = jnp.zeros_like(ref)

  rows = q_ref.shape[0]
  # Rows past nq in the last tile hold whatever lay beyond the array: zero
  # them, so that they add nothing to the key gradients.
  inside = (tile * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)) < nq
  q = jnp.where(inside, q_ref[...], 0).astype(q_ref.dtype)
  do = jnp.where(inside, do_ref[...], 0).astype(do_ref.dtype)
  sources = _key_sources(window_ref, frame, (k_ref, v_ref), sa, la, layout, rows)
  grad_refs = _key_sources(window_ref, frame, (dk_ref, dv_ref), dsa, dla,
                           layout, rows)
  logits = [_logits(q, k[index], mask, scale) for k, _, index, mask in sources]
  weights, total = _exp_and_total(logits)
  probs = [w / total for w in weights]
  dprobs = [jax.lax.dot_general(do, v[index], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
            for (_, v, index, _) in sources]  # dO Vᵀ
  delta = sum((p * dp).sum(axis=1, keepdims=True)
              for p, dp in zip(probs, dprobs))  # rowsum(dO * O)
  dq = jnp.zeros(q.shape, jnp.float32)
  for p, dp, (k, _, index, _), (dk, dv, _, _) in zip(probs, dprobs, sources,
                                                      grad_refs):
    dlogits = p * (dp - delta) * scale
    dq += jnp.dot(dlogits.astype(k.dtype), k[index],
                  preferred_element_type=jnp.float32)
    dk[index] += _transposed_dot(dlogits.astype(q.dtype), q)
    dv[index] += _transposed_dot(p.astype(do.dtype), do)
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _transposed_dot(a, b):
  """aᵀ b in float32: [rows, n] x [rows, d] -> [n, d]."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _backward(layout, window, *arrays_and_dout):
  """The backward kernel on the window table, the flat arrays of
  _attention and dO -> (dq, then float32 gradients of k, v and the K_SA /
  K_LA pairs)."""
  *arrays, dout = arrays_and_dout
  (q, k, v), sa, la, _ = _split_refs(arrays, layout)
  grid, q_spec, kv_spec, sa_spec, la_spec = grid_and_specs(
      layout, q.shape, k.shape, _shape(sa), _shape(la))
  kernel = functools.partial(
      _backward_kernel, layout=layout, scale=1 / math.sqrt(q.shape[-1]),
      nq=q.shape[3])
  key_specs = _key_specs(kv_spec, sa_spec, la_spec)
  # Key gradients accumulate over query tiles and frames in float32.
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)] + [
      jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in arrays[1:]]
  return _pallas(
      kernel, grid=grid, name='sta_attention_backward',
      in_specs=[q_spec, *key_specs, q_spec], out_specs=[q_spec, *key_specs],
      out_shape=out_shape, dims=('parallel', 'parallel', 'arbitrary', 'arbitrary'),
      cost=backward_cost(layout, q, k, v, sa, la))(window, *arrays, dout)


def _shape(pair):
  return None if pair is None else pair[0].shape


def _key_bytes(q, k, v, sa, la, dtype=None) -> int:
  """HBM bytes of the key/value blocks the grid copies: K_CA / V_CA once
  per (clip, head, frame), K_SA / K_LA once per (clip, head), padded to TPU
  tiles, in `dtype` (None: their own)."""
  batch, nt, heads, _, _ = q.shape
  size = lambda shape, x: padded_bytes(shape, dtype or x.dtype)
  per_frame = sum(size(x.shape[3:], x) for x in (k, v))
  per_clip = sum(size((nt, *x.shape[3:]), x) for x in sa or ())
  per_clip += sum(size(x.shape[2:], x) for x in la or ())
  return batch * heads * (nt * per_frame + per_clip)


def _q_tiles_bytes(layout: Layout, q) -> int:
  """HBM bytes of all q-shaped tiles of the grid, padded to TPU tiles."""
  batch, nt, heads, nq, head_dim = q.shape
  tiles = pl.cdiv(nq, layout.block_q)
  return batch * nt * heads * tiles * padded_bytes(
      (layout.block_q, head_dim), q.dtype)


def _rows_and_keys(layout: Layout, q, k, sa, la):
  """Query rows the grid computes (padded tiles included) and keys per row
  (masked ones included)."""
  batch, nt, heads, nq, _ = q.shape
  rows = batch * nt * heads * pl.cdiv(nq, layout.block_q) * layout.block_q
  keys = (k.shape[3] + layout.slots * (0 if sa is None else sa[0].shape[3])
          + (0 if la is None else la[0].shape[2]))
  return rows, keys


def forward_cost(layout: Layout, q, k, v, sa, la) -> pl.CostEstimate:
  """What the forward kernel does and moves (arguments as _attention's,
  arrays or ShapeDtypeStructs): per computed query row and key 4·d FLOPs
  for QKᵀ and PV, 4 for the scale, max, subtraction and sum, and one exp;
  reads of q and the key blocks, the write of the output, the window
  table."""
  return _cost(layout, q, k, v, sa, la, flops_per_logit=4 * q.shape[-1] + 4,
               q_tiles=2, key_grads=False)


def backward_cost(layout: Layout, q, k, v, sa, la) -> pl.CostEstimate:
  """What the backward kernel does and moves (arguments as forward_cost):
  per computed query row and key 10·d FLOPs (QKᵀ, dO Vᵀ, dQ, dK, dV), 8
  elementwise and one exp; reads of q, dO and the key blocks, writes of dQ
  and of the float32 key gradients, the window table."""
  return _cost(layout, q, k, v, sa, la, flops_per_logit=10 * q.shape[-1] + 8,
               q_tiles=3, key_grads=True)


def _cost(layout: Layout, q, k, v, sa, la, *, flops_per_logit: int,
          q_tiles: int, key_grads: bool) -> pl.CostEstimate:
  """CostEstimate of a kernel that computes every logit of the grid with
  `flops_per_logit` and one exp, and moves `q_tiles` q-shaped tiles per
  step, the key blocks, their float32 gradients if `key_grads`, and the
  window table."""
  rows, keys = _rows_and_keys(layout, q, k, sa, la)
  moved = (q_tiles * _q_tiles_bytes(layout, q) + _key_bytes(q, k, v, sa, la)
           + 4 * len(layout.window))
  if key_grads:
    moved += _key_bytes(q, k, v, sa, la, jnp.float32)
  return cost_estimate(flops=rows * keys * flops_per_logit,
                       transcendentals=rows * keys, bytes_accessed=moved)
