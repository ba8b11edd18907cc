"""What STAT attends to, captured by a forward pass of its own.

`capture_fn` runs the model with the `capture` flag of every STA module
(attention.ShrinkingTemporalAttention) and temporal aggregation layer
(model.TemporalBlock) set: they sow their attention into nnx.Intermediate.
The train and eval steps never set the flags, so their programs are
unchanged. `summarise` turns the sown masses into what explain and
TensorBoard draw:

  frame_maps  [L, B, nt, nt]  mass that the queries of frame i put on frame j
                              (j = i through CA, neighbours through SA, every
                              frame's class token through LA), averaged over
                              heads and queries: each row sums to 1;
  shares      [L, B, 3]       the CA / SA / LA share of that mass per block;
  cls_ca      L x [B, nt, kh, kw]  the class token's CA weights on the K_CA
                              grid, averaged over heads;
  timeline    [B, nt]         the video class token's attention on each
                              frame in the last temporal aggregation layer
                              (averaged over heads; absent with lta = 0).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from stat_jax import augment_device
from stat_jax.attention import ShrinkingTemporalAttention
from stat_jax.model import TemporalBlock
from stat_jax.train_state import ModelParts

SHARES = ('ca', 'sa', 'la')


def set_capture(model: nnx.Module, on: bool) -> None:
  """Sets the capture flag of every STA module and temporal layer."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (ShrinkingTemporalAttention, TemporalBlock)):
      module.capture = on


def forward_with_attention(model: nnx.Module, video):
  """(logits [B, classes], {'blocks': per STA block the masses of
  ShrinkingTemporalAttention.masses, 'temporal': per temporal layer the
  weights [B, heads, 1 + nt, 1 + nt]})."""
  set_capture(model, True)
  try:
    logits, sown = nnx.capture(model, nnx.Intermediate)(video)
  finally:
    set_capture(model, False)
  blocks = [sown['blocks'][i]['attn']['masses'][0]
            for i in range(len(model.blocks))]
  layers = sown.get('aggregate', {}).get('layers', {})
  temporal = [layers[i]['weights'][0]
              for i in range(len(model.aggregate.layers))]
  return logits, {'blocks': blocks, 'temporal': temporal}


def frame_map(masses: dict):
  """[B, nt, nt]: row i = where the queries of frame i put their mass."""
  nt = masses['sa'].shape[-1]
  per_query = (masses['ca'][..., None] * jnp.eye(nt)[:, None, None]
               + masses['sa'] + masses['la'])  # [B, nt, h, nq, nt]
  return per_query.mean(axis=(2, 3))


def shares(masses: dict):
  """[B, 3]: the CA, SA, LA shares of a block's attention mass."""
  parts = [masses['ca'], masses['sa'].sum(-1), masses['la'].sum(-1)]
  return jnp.stack([p.mean(axis=(1, 2, 3)) for p in parts], axis=-1)


def summarise(maps: dict) -> dict:
  """The arrays of the module docstring from forward_with_attention's maps."""
  blocks = maps['blocks']
  summary = {
      'frame_maps': jnp.stack([frame_map(m) for m in blocks]),
      'shares': jnp.stack([shares(m) for m in blocks]),
      'cls_ca': [m['cls_ca'].mean(axis=2) for m in blocks],
  }
  if maps['temporal']:  # row 0: the video class token; columns 1..: frames
    summary['timeline'] = maps['temporal'][-1][:, :, 0, 1:].mean(axis=1)
  return summary


def capture_fn(parts: ModelParts, data):
  """apply(params, uint8 video [B, T, H, W, 3]) -> (logits float32 [B,
  classes], summarise(...)): the eval-mode model, normalisation inside (as
  inference.serving_fn), with its attention captured."""

  def apply(params, video):
    model = nnx.merge(parts.eval_graph, params, parts.fresh_rngs())
    logits, maps = forward_with_attention(
        model, augment_device.normalise(video, data))
    return logits.astype(jnp.float32), summarise(maps)

  return apply


def to_numpy(summary: dict) -> dict:
  return jax.tree.map(lambda x: jax.device_get(x), summary)
