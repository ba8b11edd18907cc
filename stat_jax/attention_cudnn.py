"""STA attention implementation 'cudnn': every frame's keys packed into one
sequence for `jax.nn.dot_product_attention`'s cuDNN flash attention (GPU,
16-bit dtypes). Neighbours outside the clip are moved to the end of the
sequence and cut off by a per-frame key length; softmax does not depend on
the order of the keys, so this computes equations (7)-(8).
"""

import jax
import jax.numpy as jnp
import numpy as np


def packed_attention(q, k_cur, v_cur, k_sa, v_sa, window_index, window_valid,
                     k_la, v_la, *, implementation: str):
  """Equations (7)-(8) for all frames at once with jax.nn.dot_product_attention.

  Frame i's keys are packed as [K_CA_i, K_LA, K_SA of its neighbours inside
  the clip, those outside]; a per-frame key length cuts the last ones off.
  Shapes as in `frame_attention`, with leading [B, nt] (K_LA, V_LA: [B, h,
  n_la, d]). Returns [B, nt, h, nq, d].
  """
  batch, nt, heads, nq, head_dim = q.shape
  inside_first = np.argsort(~window_valid, axis=1, kind='stable')  # [nt, to-1]
  neighbours = np.take_along_axis(window_index, inside_first, axis=1)

  def keys(cur, sa, la):  # -> [B * nt, n_ca + n_la + (to-1) * n_sa, h, d]
    la = jnp.broadcast_to(la[:, None], (batch, nt, *la.shape[1:]))
    sa = sa[:, neighbours]  # [B, nt, to-1, h, n_sa, d]
    sa = jnp.moveaxis(sa, 2, 3).reshape(batch, nt, heads, -1, head_dim)
    packed = jnp.concatenate([cur, la, sa], axis=3)  # [B, nt, h, S, d]
    return jnp.swapaxes(packed, 2, 3).reshape(batch * nt, -1, heads, head_dim)

  lengths = (k_cur.shape[3] + k_la.shape[2]
             + k_sa.shape[3] * window_valid.sum(axis=1))  # [nt]
  query = jnp.swapaxes(q, 2, 3).reshape(batch * nt, nq, heads, head_dim)
  out = jax.nn.dot_product_attention(
      pad_to_even(query), pad_to_even(keys(k_cur, k_sa, k_la)),
      pad_to_even(keys(v_cur, v_sa, v_la)),
      key_value_seq_lengths=jnp.tile(jnp.asarray(lengths, jnp.int32), batch),
      implementation=implementation)[:, :nq]  # [B * nt, nq, h, d]
  return jnp.swapaxes(out.reshape(batch, nt, nq, heads, head_dim), 2, 3)


def pad_to_even(x):
  """[N, S, h, d] -> [N, S rounded up to even, h, d], zero rows appended.

  cuDNN's flash attention has no backward pass for odd query or key lengths
  under a padding mask; the extra key is beyond every key length (masked)
  and the extra query row is sliced off the output.
  """
  return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))


