"""Shrinking Temporal Attention (STA), paper section "Shrinking Temporal
Attention Module", equations (1)-(8).

Symbols as in the paper: nt frames, each with one spatial class token and
nh x nw patch tokens of width nc. Per frame i:

  Q, K, V = Fq(X), Fk(X), Fv(X)                         (1)
  Q̂ = P_CA(Q),  K_CA = P_CA(K),  V_CA = P_CA(V)         (2)  (cls never pooled)
  K_SA = P_SA(K_CA),  V_SA = P_SA(V_CA)                 (3)  (2D average pool)
  K_LA, V_LA = the class-token keys/values of all frames (4)-(6)
  queries [cls_i, Q̂_i] attend
  K̂_i = concat(K_CA_i, K_SA[window(i)], K_LA)            (7)
      (Table 1's ablations drop the absent sets: under CA alone both the
      class-token and the patch queries attend K_CA_i, the patch tokens
      only -- a class token's key is a key only through K_LA)
  Attention = softmax(Q̂ K̂ᵀ / sqrt(d)) V̂                 (8)  (d = head width)

window(i) = frames i-⌊to/2⌋ .. i-1, i+1 .. i+⌊to/2⌋: never frame i itself,
and neighbours outside the clip are masked out, not wrapped.

This module holds the equations: the window (`window_table`), the sets of
equation (7) for each ablation (`attention_sets`), the pooling and the
projections. Each way of computing (7)-(8) has its own module beside it:
'xla' (attention_xla.py) maps one frame's attention over the frames with
`jax.vmap`; 'cudnn' (attention_cudnn.py) packs every frame's keys into one
sequence for cuDNN's flash attention; 'pallas' (attention_pallas.py) runs
fused Pallas kernels that read the sets where they lie.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stat_jax import attention_cudnn, attention_pallas, attention_xla, conv
from stat_jax.checks.errors import UserError

ATTENTION_SETS = ('ca', 'ca+sa', 'ca+la', 'ca+sa+la')
SPATIAL_SUMMARIES = ('cls', 'avgpool')
# 'auto' resolves to 'pallas' for STAT on a TPU, else to 'xla'
# (resolve_attention_impl). 'cudnn' needs a GPU, a
# 16-bit compute dtype and a head width that is a multiple of 8 up to 128.
# 'pallas' compiles for TPUs; elsewhere its kernels are interpreted (tests).
ATTENTION_IMPLS = ('xla', 'cudnn', 'pallas', 'auto')
CUDNN_DTYPES = ('bfloat16', 'float16')
# How the heads are split off the Q/K/V projection and merged into the output
# projection (same numbers, to rounding): 'products' and 'fused_product' lay
# them out in the products themselves, 'transposed' projects the tokens and
# transposes them (split_heads).
HEAD_LAYOUTS = ('products', 'fused_product', 'transposed', 'auto')

# The init of every linear layer in the transformer (MViT / ViT recipe).
dense_init = nnx.initializers.truncated_normal(stddev=0.02)


def window_table(nt: int, window: int) -> tuple[np.ndarray, np.ndarray]:
  """Neighbour frames of every frame for Short-term Attention.

  Returns (index, valid), both [nt, window - 1]: index[i] are the frames
  i-⌊to/2⌋..i-1, i+1..i+⌊to/2⌋ clipped into the clip, valid[i] is False
  where that neighbour lies outside the clip.
  """
  half = window // 2
  offsets = np.concatenate([np.arange(-half, 0), np.arange(1, half + 1)])
  frames = np.arange(nt)[:, None] + offsets[None, :]  # [nt, to-1]
  valid = (frames >= 0) & (frames < nt)
  return np.clip(frames, 0, nt - 1).astype(np.int32), valid


def frame_masses(q, k_ca, k_sa, window_index, window_valid, k_la):
  """Where the softmax of frame i's queries puts its mass (explain only).

  Shapes as in attention_xla.frame_attention. Returns {'ca': [h, nq] on
  K_CA_i, 'sa': [h, nq, nt] on each frame's K_SA (0 outside the window and on i),
  'la': [h, nq, nt] on each frame's K_LA token (0 without LA), 'ca_keys':
  [h, nq, n_ca] the weights on each K_CA_i token}; ca + sa + la = 1.
  """
  nt, n_ca, n_sa = k_sa.shape[0], k_ca.shape[1], k_sa.shape[2]
  weights = jax.nn.softmax(
      attention_xla.frame_logits(q, k_ca, k_sa, window_index, window_valid,
                                 k_la), axis=-1)
  ca_keys = weights[..., :n_ca]
  sa_slots = weights[..., n_ca:n_ca + window_index.size * n_sa]
  sa_slots = sa_slots.reshape(*weights.shape[:2], window_index.shape[0],
                              n_sa).sum(-1)  # [h, nq, to-1]
  to_frame = jax.nn.one_hot(window_index, nt) * window_valid[:, None]  # [to-1, nt]
  la = weights[..., n_ca + window_index.size * n_sa:]  # [h, nq, nt or 0]
  if la.shape[-1] != nt:
    la = jnp.zeros((*weights.shape[:2], nt), weights.dtype)
  return {'ca': ca_keys.sum(-1), 'sa': sa_slots @ to_frame, 'la': la,
          'ca_keys': ca_keys}


def resolve_attention_impl(impl: str, platform: str | None = None,
                           arch: str = 'stat') -> str:
  """'xla', 'cudnn' or 'pallas' for ATTENTION_IMPLS `impl` on `platform`
  (default: the default backend's), in a model of `arch`.

  'auto' is 'pallas' for STAT's attention on a TPU (the whole train step
  is estimated faster and smaller with its kernels: benchmarks/RESULTS.md),
  else 'xla', which runs on every backend and dtype (MViT's attention has
  no Pallas kernel). 'cudnn' is chosen explicitly. 'pallas' is refused on
  a GPU, where its TPU kernels do not lower.
  """
  platform = platform or jax.default_backend()
  if impl == 'pallas' and platform == 'gpu':
    raise UserError("config.model.attention_impl = 'pallas': its kernels are "
                    'Pallas TPU kernels, which do not lower on a GPU; use '
                    'cudnn or xla there')
  if impl != 'auto':
    return impl
  return 'pallas' if platform == 'tpu' and arch == 'stat' else 'xla'


def shrinking_temporal_attention(q, k, v, k_sa, v_sa, *, attention: str,
                                 window: int, num_summary: int,
                                 impl: str = 'xla'):
  """STA for a batch of clips, computed by implementation `impl`.

  Args:
    q: [B, nt, h, nq, d] queries (summary token first, if any).
    k, v: [B, nt, h, num_summary + n_ca, d] pooled keys/values; the first
      `num_summary` (0 or 1) tokens of each frame are its class token.
    k_sa, v_sa: [B, nt, h, n_sa, d] short-term tokens (None without SA).
    attention: one of ATTENTION_SETS.
    window: the temporal window `to` (odd).
    num_summary: 1 with spatial class tokens, 0 with avg-pooled summaries.
    impl: 'xla' (attention_xla.py), 'cudnn' (attention_cudnn.py) or
      'pallas' (attention_pallas.py).
  Returns:
    [B, nt, h, nq, d]
  """
  k_cur, v_cur, k_sa, v_sa, index, valid, k_la, v_la = attention_sets(
      k, v, k_sa, v_sa, attention=attention, window=window,
      num_summary=num_summary)
  if impl == 'cudnn':
    return attention_cudnn.packed_attention(
        q, k_cur, v_cur, k_sa, v_sa, index, valid, k_la, v_la,
        implementation='cudnn')
  if impl == 'pallas':  # K_CA_i read in place, class token masked
    return attention_pallas.pallas_attention(
        q, k, v, k_sa, v_sa, index, valid, k_la, v_la,
        num_summary=num_summary)
  return attention_xla.xla_attention(q, k_cur, v_cur, k_sa, v_sa, index,
                                     valid, k_la, v_la)


def attention_sets(k, v, k_sa, v_sa, *, attention: str, window: int,
                   num_summary: int):
  """The key / value sets of equation (7) for `attention`, as
  attention_xla.frame_attention takes them (arguments as in
  shrinking_temporal_attention): (k_cur, v_cur [B, nt, h, n_ca, d], k_sa,
  v_sa [B, nt, h, n_sa or 0, d], window index, valid [nt, to-1 or 0],
  k_la, v_la [B, h, nt or 0, d])."""
  batch, nt, heads, _, head_dim = k.shape
  use_sa, use_la = 'sa' in attention, 'la' in attention
  if use_la and num_summary:  # K_LA: the class-token keys of all frames
    k_la, v_la = k[:, :, :, 0], v[:, :, :, 0]  # [B, nt, h, d]
    k_cur, v_cur = k[:, :, :, 1:], v[:, :, :, 1:]
  elif use_la:  # Table 3 "spatial avg-pooling": pooled keys as summaries
    k_la, v_la = k.mean(axis=3), v.mean(axis=3)
    k_cur, v_cur = k, v
  else:  # no LA: K̂_i = K_CA_i (+ K_SA), the pooled patch tokens only; a
    # class-token key enters equation (7) only as part of K_LA
    k_la = v_la = jnp.zeros((batch, 0, heads, head_dim), k.dtype)
    k_cur, v_cur = k[:, :, :, num_summary:], v[:, :, :, num_summary:]
  k_la = jnp.moveaxis(k_la, 1, 2)  # [B, h, nt or 0, d]
  v_la = jnp.moveaxis(v_la, 1, 2)
  if use_sa:
    index, valid = window_table(nt, window)
  else:
    index, valid = np.zeros((nt, 0), np.int32), np.zeros((nt, 0), bool)
    k_sa = v_sa = jnp.zeros((batch, nt, heads, 0, head_dim), k.dtype)
  return k_cur, v_cur, k_sa, v_sa, index, valid, k_la, v_la


def attention_masses(q, k, k_sa, *, attention: str, window: int,
                     num_summary: int) -> dict:
  """`frame_masses` of every clip and frame (arguments as in
  shrinking_temporal_attention): {'ca': [B, nt, h, nq], 'sa', 'la': [B,
  nt, h, nq, nt], 'ca_keys': [B, nt, h, nq, n_ca]}."""
  k_cur, _, k_sa, _, index, valid, k_la, _ = attention_sets(
      k, k, k_sa, k_sa, attention=attention, window=window,
      num_summary=num_summary)
  per_frame = jax.vmap(frame_masses, in_axes=(0, 0, None, 0, 0, None))
  per_clip = jax.vmap(per_frame, in_axes=(0, 0, 0, None, None, 0))
  return per_clip(q, k_cur, k_sa, index, valid, k_la)


class Pool(nnx.Module):
  """P_CA: a depthwise conv + LayerNorm over each head (MViT's "conv"
  pooling), 2D over each frame's grid for STA, 3D over the clip's grid for
  MViT (`stride` has one entry per grid axis).

  The conv weights are shared by the heads; summary tokens are not pooled
  but are normalised with the pooled tokens.
  """

  def __init__(self, head_dim: int, kernel: int, stride: tuple[int, ...], *,
               conv_impl: str, dtype, rngs: nnx.Rngs):
    self.conv = nnx.Conv(
        head_dim, head_dim, (kernel,) * len(stride), stride,
        padding=[(kernel // 2, kernel // 2)] * len(stride),
        feature_group_count=head_dim, use_bias=False, dtype=dtype,
        conv_general_dilated=conv.conv_function(conv_impl), rngs=rngs)
    self.norm = nnx.LayerNorm(head_dim, dtype=dtype, rngs=rngs)

  def output_grid(self, grid):
    """The pooled grid (the conv's 'same'-style padding)."""
    return tuple((n + 2 * (k // 2) - k) // s + 1 for n, k, s
                 in zip(grid, self.conv.kernel_size, self.conv.strides))

  def __call__(self, x, grid, num_summary):
    """x: [B, nt, h, num_summary + prod(grid), d] -> same with the grid
    pooled (nt = 1 for a grid over the whole clip)."""
    batch, nt, heads, _, head_dim = x.shape
    summary, patches = x[:, :, :, :num_summary], x[:, :, :, num_summary:]
    patches = patches.reshape(batch * nt * heads, *grid, head_dim)
    patches = self.conv(patches)  # [B*nt*h, *pooled grid, d]
    patches = patches.reshape(batch, nt, heads, -1, head_dim)
    pooled = self.norm(jnp.concatenate([summary, patches], axis=3))
    return pooled, self.output_grid(grid)


def short_term_pool(x, grid, size: int):
  """P_SA: 2D average pool ('SAME' padding) of K_CA or V_CA patches.

  x: [B, nt, h, nh*nw, d] -> [B, nt, h, ňh*ňw, d].
  """
  batch, nt, heads, _, head_dim = x.shape
  pooled = nnx.avg_pool(x.reshape(batch * nt * heads, *grid, head_dim),
                        window_shape=(size, size), strides=(size, size),
                        padding='SAME', count_include_pad=False)
  # The pad-aware divisor is float32: cast back, or bf16 attention would run
  # on float32 keys (and cuDNN refuses mixed dtypes).
  return pooled.reshape(batch, nt, heads, -1, head_dim).astype(x.dtype)


def resolve_head_layout(layout: str, platform: str | None = None) -> str:
  """The HEAD_LAYOUTS entry other than 'auto' for `layout` on `platform`
  (default: the default backend's).

  'auto' lays the heads out in the products on GPUs and TPUs, where every
  transpose of the projected tokens is a copy through memory: 'products' on
  a TPU, 'fused_product' on a GPU (benchmarks/RESULTS.md has both on both);
  'transposed' on the CPU, whose dots run faster writing plain [tokens,
  channels] rows.
  """
  if layout != 'auto':
    return layout
  return {'cpu': 'transposed', 'gpu': 'fused_product'}.get(
      platform or jax.default_backend(), 'products')


def _linear_arrays(linear: nnx.Linear, x):
  """(x, kernel, bias or None) promoted to `linear`'s dtype."""
  bias = linear.bias[...] if linear.bias is not None else None
  return linear.promote_dtype((x, linear.kernel[...], bias), dtype=linear.dtype)


def split_heads(linear: nnx.Linear, x, heads: int, layout: str):
  """Fq, Fk, Fv of equation (1): x [B, nt, N, C] -> q, k, v [B, nt, h, N,
  d] through `linear` ([C, 3C], the fused projection).

  'transposed' applies `linear` and transposes its [B, nt, N, 3, h, d]
  output. The others view the kernel as [C, 3, h, d], so that a product
  lays out the heads itself: 'products' takes Q, K and V as three products
  (XLA:TPU copies each that is cut out of a larger product);
  'fused_product' cuts them out of one [3, B, nt, h, N, d] product (XLA:GPU
  fuses the cuts into their readers, and the input gradient is one product,
  not three summed).
  """
  if layout == 'transposed':
    batch, nt, tokens, _ = x.shape
    qkv = linear(x).reshape(batch, nt, tokens, 3, heads, -1)
    return tuple(jnp.moveaxis(qkv, (3, 4), (0, 3)))  # 3 x [B, nt, h, N, d]
  x, kernel, bias = _linear_arrays(linear, x)
  kernel = kernel.reshape(x.shape[-1], 3, heads, -1)  # [C, 3, h, d]
  if bias is not None:
    bias = bias.reshape(3, 1, 1, heads, 1, -1)
  if layout == 'fused_product':
    qkv = jnp.einsum('bfnc,cthd->tbfhnd', x, kernel)  # [3, B, nt, h, N, d]
    if bias is not None:
      qkv = qkv + bias
    return qkv[0], qkv[1], qkv[2]
  products = [jnp.einsum('bfnc,chd->bfhnd', x, kernel[:, t]) for t in range(3)]
  if bias is not None:
    products = [y + b for y, b in zip(products, bias)]
  return tuple(products)  # 3 x [B, nt, h, N, d]


def merge_heads(linear: nnx.Linear, out, layout: str):
  """The output projection: out [B, nt, h, nq, d] -> [B, nt, nq, C], as
  `linear` on the heads concatenated along the channels.

  'transposed' moves the heads next to d and applies `linear`; the other
  layouts contract over (h, d) at once.
  """
  batch, nt, heads, tokens, head_dim = out.shape
  if layout == 'transposed':
    return linear(jnp.moveaxis(out, 2, 3).reshape(batch, nt, tokens, -1))
  out, kernel, bias = _linear_arrays(linear, out)
  y = jnp.einsum('bfhqd,hde->bfqe', out,
                 kernel.reshape(heads, head_dim, -1))  # [B, nt, nq, C]
  return y if bias is None else y + bias


class ShrinkingTemporalAttention(nnx.Module):
  """STA over tokens [B, nt, num_summary + nh*nw, C] (module form of (1)-(8))."""

  def __init__(self, dim: int, heads: int, *, q_stride: int, kv_stride: int,
               attention: str, window: int, num_summary: int, pool_kernel: int,
               sa_pool: int, qkv_bias: bool, dtype, rngs: nnx.Rngs,
               attention_impl: str = 'xla', conv_impl: str = 'auto',
               head_layout: str = 'auto'):
    head_dim = dim // heads
    self.heads, self.attention, self.window = heads, attention, window
    self.impl = resolve_attention_impl(attention_impl)
    self.head_layout = resolve_head_layout(head_layout)
    self.num_summary, self.sa_pool = num_summary, sa_pool
    self.capture = False  # True: sow the attention masses (explain only)
    # Fq, Fk, Fv of equation (1), fused into one C -> 3C projection.
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          kernel_init=dense_init, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, kernel_init=dense_init,
                           rngs=rngs)
    pool = functools.partial(Pool, head_dim, pool_kernel, conv_impl=conv_impl,
                             dtype=dtype, rngs=rngs)
    self.pool_q = pool((q_stride,) * 2) if q_stride > 1 else None
    self.pool_k = pool((kv_stride,) * 2)
    self.pool_v = pool((kv_stride,) * 2)

  def output_grid(self, grid):
    """The token grid of the output: Q's, pooled at a stage transition."""
    return grid if self.pool_q is None else self.pool_q.output_grid(grid)

  def masses(self, q, k, k_sa, kv_grid) -> dict:
    """attention_masses, with 'ca_keys' replaced by 'cls_ca': [B, nt, h,
    kh, kw] the class token's weights on the K_CA grid (the mean query's
    with avg-pooled summaries)."""
    masses = attention_masses(q, k, k_sa, attention=self.attention,
                              window=self.window, num_summary=self.num_summary)
    ca_keys = masses.pop('ca_keys')  # [B, nt, h, nq, n_ca]
    cls = ca_keys[:, :, :, 0] if self.num_summary else ca_keys.mean(axis=3)
    return dict(masses, cls_ca=cls.reshape(*cls.shape[:3], *kv_grid))

  def __call__(self, x, grid):
    """x: [B, nt, num_summary + nh*nw, C] -> ([B, nt, num_summary + ñh*ñw, C], (ñh, ñw))."""
    q, k, v = split_heads(self.qkv, x, self.heads,
                          self.head_layout)  # 3 x [B, nt, h, N, d]
    out_grid = grid
    if self.pool_q is not None:  # Q̂ = P_CA(Q), only at stage transitions
      q, out_grid = self.pool_q(q, grid, self.num_summary)
    k, kv_grid = self.pool_k(k, grid, self.num_summary)  # K_CA (+ cls)
    v, _ = self.pool_v(v, grid, self.num_summary)  # V_CA (+ cls)
    k_sa = v_sa = None
    if 'sa' in self.attention:  # K_SA = P_SA(K_CA), V_SA = P_SA(V_CA)
      k_sa = short_term_pool(k[:, :, :, self.num_summary:], kv_grid, self.sa_pool)
      v_sa = short_term_pool(v[:, :, :, self.num_summary:], kv_grid, self.sa_pool)
    if self.capture:  # explain only (stat_jax/attention_maps.py)
      self.sow(nnx.Intermediate, 'masses', self.masses(q, k, k_sa, kv_grid))
    out = shrinking_temporal_attention(
        q, k, v, k_sa, v_sa, attention=self.attention, window=self.window,
        num_summary=self.num_summary, impl=self.impl)  # [B, nt, h, nq, d]
    return merge_heads(self.proj, out, self.head_layout), out_grid
