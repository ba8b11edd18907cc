"""MViT-B v1 (Fan et al. 2021), the paper's baseline, from STAT's parts.

`model.arch = 'mvit'` (configs/mvit_b.py): PySlowFast's
MVIT_B_16x4_CONV / 32x3 and torchvision's `mvit_v1_b`. What differs from
STAT is here: one class token for the whole clip with separate space, time
and class position embeddings, and pooling attention over all the clip's
tokens, with Q, K and V pooled by depthwise 3D convs. The patch embedding
(the 1-layer stem), block layout (arch.block_specs), MLP, norms, drop path,
stage-transition skips and head are STAT's, and so are training, eval and
export.

The tokens are [B, 1, 1 + nt*nh*nw, C]: one token set per clip, the class
token first, the patches in (t, h, w) order; the axis of size 1 is STAT's
frame axis, so that STAT's block code (STABlock.output_tokens, the drop
path, the head split of attention.py) runs on them unchanged.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from stat_jax import arch
from stat_jax.attention import (Pool, dense_init, merge_heads,
                                resolve_attention_impl, resolve_head_layout,
                                split_heads)
from stat_jax.model import (STABlock, TokenEmbedding, check_video,
                            embedding_init, resolve_dtype, run_blocks)


class PoolingAttention(nnx.Module):
  """Multi-head pooling attention: Q, K, V pooled (Q only at a stage
  transition), then softmax(Q Kᵀ / sqrt(d)) V over all the clip's tokens."""

  def __init__(self, dim: int, heads: int, *, q_stride: int, kv_stride: int,
               model: ml_collections.ConfigDict, dtype, rngs: nnx.Rngs):
    head_dim = dim // heads
    self.heads = heads
    self.impl = resolve_attention_impl(model.attention_impl, arch='mvit')
    self.head_layout = resolve_head_layout(model.head_layout)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=model.qkv_bias, dtype=dtype,
                          kernel_init=dense_init, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, kernel_init=dense_init,
                           rngs=rngs)
    pool = functools.partial(Pool, head_dim, model.pool_kernel,
                             conv_impl=model.conv_impl, dtype=dtype, rngs=rngs)
    # Time is never strided: Q is pooled in space at stage transitions, K
    # and V with MViT's adaptive spatial stride (arch.block_specs).
    self.pool_q = pool((1, q_stride, q_stride)) if q_stride > 1 else None
    self.pool_k = pool((1, kv_stride, kv_stride))
    self.pool_v = pool((1, kv_stride, kv_stride))

  def output_grid(self, grid):
    """The token grid of the output: Q's, pooled at a stage transition."""
    return grid if self.pool_q is None else self.pool_q.output_grid(grid)

  def __call__(self, x, grid):
    """x: [B, 1, 1 + nt*nh*nw, C] -> ([B, 1, 1 + N_q, C], the Q grid)."""
    q, k, v = split_heads(self.qkv, x, self.heads,
                          self.head_layout)  # [B, 1, h, N, d]
    if self.pool_q is not None:
      q, _ = self.pool_q(q, grid, 1)  # the class token not pooled
    (k, _), (v, _) = self.pool_k(k, grid, 1), self.pool_v(v, grid, 1)
    out = jax.nn.dot_product_attention(
        *(jnp.swapaxes(t[:, 0], 1, 2) for t in (q, k, v)),  # [B, N, h, d]
        implementation=self.impl)
    out = jnp.swapaxes(out, 1, 2)[:, None]  # [B, 1, h, N_q, d]
    return merge_heads(self.proj, out, self.head_layout), self.output_grid(grid)


class MViTBlock(STABlock):
  """STABlock's residual structure (output_tokens) around pooling attention.

  At a stage transition the skip is max-pooled like Q: kernel (1, 3, 3),
  stride (1, 2, 2), the class token not pooled (STABlock.skip per frame).
  """

  def __init__(self, spec: arch.BlockSpec, model: ml_collections.ConfigDict,
               *, dtype, rngs):
    # STABlock.skip sees the patches frame by frame: no summary tokens.
    super().__init__(spec, model, num_summary=0, dtype=dtype, rngs=rngs)

  def make_attention(self, spec, model, *, dtype, rngs) -> PoolingAttention:
    return PoolingAttention(spec.dim, spec.heads, q_stride=spec.q_stride,
                            kv_stride=spec.kv_stride, model=model,
                            dtype=dtype, rngs=rngs)

  def skip(self, x, grid):
    """x: [B, 1, 1 + nt*nh*nw, C] -> [B, 1, 1 + nt*nh'*nw', C]."""
    if self.q_stride == 1:
      return x
    batch, _, _, dim = x.shape
    nt, nh, nw = grid
    patches = x[:, 0, 1:].reshape(batch, nt, nh * nw, dim)
    patches = super().skip(patches, (nh, nw))  # [B, nt, nh'*nw', C]
    return jnp.concatenate([x[:, :, :1], patches.reshape(batch, 1, -1, dim)],
                           axis=2)


class MViT(nnx.Module):
  """video [B, T, H, W, 3] (normalised) -> logits [B, num_classes]."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    model = config.model
    dtype = jnp.dtype(resolve_dtype(config.dtype))
    blocks = arch.block_specs(model)
    stem = arch.stem_specs(model)  # stem_layers = 1: the patch embedding
    self.remat = config.remat
    self.input_shape = (config.data.num_frames, config.data.crop_size,
                        config.data.crop_size, 3)
    nt, nh, nw = self.grid = arch.token_grid(config)
    dim, width = stem[-1].features, blocks[-1].dim_out

    self.embed = TokenEmbedding(stem, conv_impl=model.conv_impl, dtype=dtype,
                                rngs=rngs)
    # PySlowFast's layout and names: cls_token, pos_embed_{spatial,
    # temporal,class}.
    self.cls_token = nnx.Param(embedding_init(rngs.params(), (1, 1, dim)))
    self.pos_spatial = nnx.Param(embedding_init(rngs.params(), (1, nh * nw, dim)))
    self.pos_temporal = nnx.Param(embedding_init(rngs.params(), (1, nt, dim)))
    self.pos_class = nnx.Param(embedding_init(rngs.params(), (1, 1, dim)))
    self.blocks = nnx.List([MViTBlock(spec, model, dtype=dtype, rngs=rngs)
                            for spec in blocks])
    self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(model.dropout, rngs=rngs)
    self.head = nnx.Linear(width, model.num_classes, dtype=dtype,
                           kernel_init=dense_init, rngs=rngs)

  def tokens(self, video):
    """video -> [B, 1, 1 + nt*nh*nw, C], position embeddings added."""
    x = self.embed(video)  # [B, nt, nh, nw, C]
    batch, nt, nh, nw, dim = x.shape
    position = (self.pos_temporal[...][:, :, None]
                + self.pos_spatial[...][:, None])  # [1, nt, nh*nw, C]
    x = x.reshape(batch, nt, nh * nw, dim) + position.astype(x.dtype)
    cls = (self.cls_token[...] + self.pos_class[...]).astype(x.dtype)
    cls = jnp.broadcast_to(cls[:, None], (batch, 1, 1, dim))
    return jnp.concatenate([cls, x.reshape(batch, 1, -1, dim)], axis=2)

  def __call__(self, video):
    check_video('MViT', video, self.input_shape)
    x = run_blocks(self.blocks, self.tokens(video), self.grid,
                   remat=self.remat)
    cls = self.norm(x[:, 0, 0])  # [B, C]
    return self.head(self.dropout(cls))
