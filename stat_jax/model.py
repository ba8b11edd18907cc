"""STAT: token embedding block, STA blocks, temporal aggregation block.

Paper section "Shrinking Temporal Attention Transformer", Figure 2. The
layout (stem convs, widths, heads, pooling strides) comes from arch.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights

from stat_jax import arch, conv
from stat_jax.attention import (ShrinkingTemporalAttention, dense_init,
                                resolve_attention_impl, resolve_head_layout)
from stat_jax.kernels import mlp as mlp_kernel

embedding_init = nnx.initializers.truncated_normal(stddev=0.02)


def gelu(x):
  """The exact (erf) GELU of MViT / PySlowFast (torch.nn.GELU); jax.nn.gelu
  defaults to the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def drop_path(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """Stochastic depth: drops a whole residual branch per clip."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), rngs=rngs)


class TokenEmbedding(nnx.Module):
  """Conv stem (Table 5) -> [B, nt, nh, nw, nc].

  The paper calls the layers "vanilla 3D-convolutional layers"; between them
  we put LayerNorm + GELU (a stack of bare convs would be one linear map).
  """

  def __init__(self, specs: tuple[arch.ConvSpec, ...], *, conv_impl: str,
               dtype, rngs):
    features = [3] + [s.features for s in specs]
    self.convs = nnx.List([
        nnx.Conv(fin, s.features, s.kernel, s.stride,
                 padding=[(k // 2, k // 2) for k in s.kernel], dtype=dtype,
                 conv_general_dilated=conv.conv_function(conv_impl), rngs=rngs)
        for fin, s in zip(features, specs)
    ])
    self.norms = nnx.List([
        nnx.LayerNorm(s.features, dtype=dtype, rngs=rngs) for s in specs[:-1]
    ])

  def __call__(self, video):
    x = video
    for layer, norm in zip(self.convs[:-1], self.norms):
      x = gelu(norm(layer(x)))
    return self.convs[-1](x)


class Mlp(nnx.Module):

  def __init__(self, dim: int, hidden: int, dim_out: int, *, dtype, rngs):
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, kernel_init=dense_init,
                          rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim_out, dtype=dtype, kernel_init=dense_init,
                          rngs=rngs)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x)))


class STABlock(nnx.Module):
  """Equations (9)-(10): X_a = STA(LN(X)) + X, X_out = MLP(LN(X_a)) + X_a.

  At a stage transition the skip of the attention is max-pooled like Q, and
  the skip of the MLP is a projection of LN(X_a) to the wider width (MViT).
  """

  def __init__(self, spec: arch.BlockSpec, model: ml_collections.ConfigDict,
               *, num_summary: int, dtype, rngs):
    dim = spec.dim
    self.q_stride, self.num_summary = spec.q_stride, num_summary
    self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attn = self.make_attention(spec, model, dtype=dtype, rngs=rngs)
    self.drop_path = drop_path(spec.drop_path, rngs)
    self.norm2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp = Mlp(dim, int(dim * model.mlp_ratio), spec.dim_out, dtype=dtype,
                   rngs=rngs)
    self.proj = (nnx.Linear(dim, spec.dim_out, dtype=dtype,
                            kernel_init=dense_init, rngs=rngs)
                 if spec.dim_out != dim else None)
    # The fused kernel where the MLP's skip is its input (no projection).
    self.mlp_impl = (mlp_kernel.resolve_mlp_impl(model.mlp_impl)
                     if self.proj is None and dim <= mlp_kernel.MAX_WIDTH
                     else 'xla')

  def make_attention(self, spec: arch.BlockSpec,
                     model: ml_collections.ConfigDict, *, dtype,
                     rngs) -> nnx.Module:
    """STA (mvit.MViTBlock puts pooling attention here)."""
    return ShrinkingTemporalAttention(
        spec.dim, spec.heads, q_stride=spec.q_stride, kv_stride=spec.kv_stride,
        attention=model.attention, window=model.window,
        num_summary=self.num_summary, pool_kernel=model.pool_kernel,
        sa_pool=model.sa_pool, qkv_bias=model.qkv_bias, dtype=dtype, rngs=rngs,
        attention_impl=model.attention_impl, conv_impl=model.conv_impl,
        head_layout=model.head_layout)

  def skip(self, x, grid):
    """Max-pool the patch tokens like Q (kernel 3, stride q_stride)."""
    if self.q_stride == 1:
      return x
    batch, nt, _, dim = x.shape
    summary, patches = x[:, :, :self.num_summary], x[:, :, self.num_summary:]
    patches = patches.reshape(batch * nt, *grid, dim)
    # -inf padding + 'VALID' (not padding pairs): the same pool, and one that
    # jax2onnx converts exactly.
    patches = jnp.pad(patches, ((0, 0), (1, 1), (1, 1), (0, 0)),
                      constant_values=-jnp.inf)
    patches = nnx.max_pool(patches, window_shape=(3, 3),
                           strides=(self.q_stride, self.q_stride),
                           padding='VALID')
    patches = patches.reshape(batch, nt, -1, dim)
    return jnp.concatenate([summary, patches], axis=2)

  def __call__(self, x, grid):
    """x: [B, nt, num_summary + nh*nw, C] -> ([B, nt, ., C_out], new grid)."""
    return self.output_tokens(x, grid), self.attn.output_grid(grid)

  def output_tokens(self, x, grid):
    """The output tokens alone (what remat recomputes; grid is static)."""
    attended, _ = self.attn(self.norm1(x), grid)
    x = self.skip(x, grid) + self.drop_path(attended)
    if self.mlp_impl != 'xla':
      return self.fused_mlp(x)
    x_norm = self.norm2(x)
    if self.proj is not None:
      x = self.proj(x_norm)
    return x + self.drop_path(self.mlp(x_norm))

  def fused_mlp(self, x):
    """x + drop_path(MLP(norm2(x))) by the Pallas kernel, frame by frame."""
    # The drop-path scale of each clip: the mask nnx.Dropout draws for x.
    scale = self.drop_path(jnp.ones((x.shape[0], 1, 1, 1), jnp.float32))
    fc1, fc2 = self.mlp.fc1, self.mlp.fc2
    weights = mlp_kernel.MlpWeights(
        self.norm2.scale[...], self.norm2.bias[...],
        fc1.kernel[...].astype(x.dtype), fc1.bias[...],
        fc2.kernel[...].astype(x.dtype), fc2.bias[...])
    return mlp_kernel.fused_mlp_clips(x, scale.reshape(-1), weights,
                                      self.norm2.epsilon)


class TemporalBlock(nnx.Module):
  """One layer of the light temporal aggregation block: x + MHSA(LN(x)).

  The paper: "interacts with all spatial class tokens using lta Multi-Headed
  Self Attention layers" -- attention only. `mlp_ratio` > 0 (config
  `model.lta_mlp`) adds a transformer MLP, x + MLP(LN(x)), after it.
  """

  def __init__(self, dim: int, heads: int, mlp_ratio: float, *, dtype, rngs):
    self.capture = False  # True: sow the attention weights (explain only)
    self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        heads, dim, dtype=dtype, kernel_init=dense_init, decode=False,
        deterministic=True, rngs=rngs)
    self.norm2 = (nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
                  if mlp_ratio else None)
    self.mlp = (Mlp(dim, int(dim * mlp_ratio), dim, dtype=dtype, rngs=rngs)
                if mlp_ratio else None)

  def attention_weights(self, x):
    """x: [B, L, C] (normalised) -> the softmax weights [B, heads, L, L]."""
    return dot_product_attention_weights(self.attn.query(x), self.attn.key(x))

  def __call__(self, x):
    normed = self.norm1(x)
    if self.capture:  # explain only; sow_weights would change the kernel
      self.sow(nnx.Intermediate, 'weights', self.attention_weights(normed))
    x = x + self.attn(normed)
    if self.mlp is None:
      return x
    return x + self.mlp(self.norm2(x))


class TemporalAggregation(nnx.Module):
  """A learnable video class token + `lta` MHSA layers over the frame
  summaries; `lta = 0` averages the frame summaries (Table 4)."""

  def __init__(self, dim: int, heads: int, lta: int, mlp_ratio: float, *,
               dtype, rngs):
    self.video_cls = nnx.Param(embedding_init(rngs.params(), (1, 1, dim)))
    self.layers = nnx.List([
        TemporalBlock(dim, heads, mlp_ratio, dtype=dtype, rngs=rngs)
        for _ in range(lta)
    ])

  def __call__(self, frames):
    """frames: [B, nt, C] -> [B, C]."""
    if not self.layers:
      return frames.mean(axis=1)
    video_cls = jnp.broadcast_to(self.video_cls[...].astype(frames.dtype),
                                 (frames.shape[0], 1, frames.shape[2]))
    x = jnp.concatenate([video_cls, frames], axis=1)  # [B, 1 + nt, C]
    for layer in self.layers:
      x = layer(x)
    return x[:, 0]


class STAT(nnx.Module):
  """video [B, T, H, W, 3] (normalised) -> logits [B, num_classes]."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    model = config.model
    dtype = jnp.dtype(resolve_dtype(config.dtype))
    blocks = arch.block_specs(model)
    stem = arch.stem_specs(model)
    self.num_summary = 1 if model.spatial_summary == 'cls' else 0
    self.remat = config.remat
    self.input_shape = (config.data.num_frames, config.data.crop_size,
                        config.data.crop_size, 3)
    nt, nh, nw = arch.token_grid(config)
    dim, last = stem[-1].features, blocks[-1]

    self.embed = TokenEmbedding(stem, conv_impl=model.conv_impl,
                                dtype=dtype, rngs=rngs)
    if self.num_summary:  # one spatial class token, shared by all frames
      self.cls_token = nnx.Param(embedding_init(rngs.params(), (1, 1, 1, dim)))
    # Separate spatial (class token + nh*nw) and temporal position embeddings.
    self.pos_spatial = nnx.Param(
        embedding_init(rngs.params(), (1, 1, self.num_summary + nh * nw, dim)))
    self.pos_temporal = nnx.Param(embedding_init(rngs.params(), (1, nt, 1, dim)))
    self.blocks = nnx.List([
        STABlock(spec, model, num_summary=self.num_summary, dtype=dtype,
                 rngs=rngs) for spec in blocks
    ])
    self.aggregate = TemporalAggregation(
        last.dim_out, last.heads, model.lta,
        model.mlp_ratio if model.lta_mlp else 0.0, dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(last.dim_out, dtype=dtype, rngs=rngs)
    self.dropout = nnx.Dropout(model.dropout, rngs=rngs)
    self.head = nnx.Linear(last.dim_out, model.num_classes, dtype=dtype,
                           kernel_init=dense_init, rngs=rngs)

  def tokens(self, video):
    """Token embedding block: video -> ([B, nt, num_summary + nh*nw, C], grid)."""
    x = self.embed(video)  # [B, nt, nh, nw, C]
    batch, nt, nh, nw, dim = x.shape
    x = x.reshape(batch, nt, nh * nw, dim)
    if self.num_summary:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype),
                             (batch, nt, 1, dim))
      x = jnp.concatenate([cls, x], axis=2)
    x = x + self.pos_spatial[...].astype(x.dtype)
    return x + self.pos_temporal[...].astype(x.dtype), (nh, nw)

  def __call__(self, video):
    check_video('STAT', video, self.input_shape)
    x = run_blocks(self.blocks, *self.tokens(video), remat=self.remat)
    if self.num_summary:  # the spatial class token of each frame
      frames = x[:, :, 0]  # [B, nt, C]
    else:  # Table 3 "spatial avg-pooling"
      frames = x.mean(axis=2)
    video_embedding = self.norm(self.aggregate(frames))  # [B, C]
    return self.head(self.dropout(video_embedding))


def check_video(model_name: str, video, input_shape: tuple) -> None:
  """ValueError unless video is [B, *input_shape]."""
  if video.shape[1:] != input_shape:
    raise ValueError(f'{model_name} expects video [B, {", ".join(map(str, input_shape))}]'
                     f' (config data.num_frames, data.crop_size); got {video.shape}')


def run_blocks(blocks, x, grid, *, remat: bool):
  """The STA (or MViT) blocks in order on tokens x of token grid `grid`."""
  # remat: keep only each block's input for the backward pass.
  block_tokens = (nnx.remat(STABlock.output_tokens, static_argnums=2)
                  if remat else STABlock.output_tokens)
  for block in blocks:
    x, grid = block_tokens(block, x, grid), block.attn.output_grid(grid)
  return x


def resolve_dtype(dtype: str, platform: str | None = None) -> str:
  """The compute dtype of config `dtype` on `platform` (default: the default
  backend's): 'auto' is bfloat16 on TPUs and GPUs, whose matmul units run
  it at several times their float32 rate, float32 on the CPU, where
  bfloat16 buys nothing and the casts cost."""
  if dtype != 'auto':
    return dtype
  return 'float32' if (platform or jax.default_backend()) == 'cpu' else 'bfloat16'


def resolve_for_platform(config: ml_collections.ConfigDict,
                         platform: str | None) -> None:
  """Settle config.dtype, model.conv_impl, model.head_layout,
  model.mlp_impl and model.attention_impl 'auto' for `platform` (None:
  this process's backend), for a program compiled here to run on another
  platform: 'auto' would otherwise follow the compiling host."""
  config.dtype = resolve_dtype(config.dtype, platform)
  config.model.conv_impl = conv.resolve_conv_impl(config.model.conv_impl,
                                                 platform)
  config.model.head_layout = resolve_head_layout(config.model.head_layout,
                                                 platform)
  config.model.mlp_impl = mlp_kernel.resolve_mlp_impl(config.model.mlp_impl,
                                                      platform)
  config.model.attention_impl = resolve_attention_impl(
      config.model.attention_impl, platform, config.model.arch)
