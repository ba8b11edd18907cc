"""STA attention implementation 'xla': equations (7)-(8) written for one
frame (`frame_attention`: K̂_i and V̂_i concatenated, a float32 softmax) and
mapped over the frames and clips with `jax.vmap`. It runs on every backend
and dtype.
"""

import jax
import jax.numpy as jnp
import numpy as np


def gather_window(x, window_index):
  """[nt, h, n_sa, d] -> [h, (to-1) * n_sa, d]: the window's SA tokens."""
  x = x[window_index]  # [to-1, h, n_sa, d]
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, x.shape[3])


def frame_logits(q, k_ca, k_sa, window_index, window_valid, k_la):
  """Scaled logits of frame i's queries over K̂_i = [K_CA_i, K_SA of the
  window, K_LA] (equation (7)), -inf on neighbours outside the clip.
  Shapes as in `frame_attention`; returns float32 [h, nq, n_ca +
  (to-1) * n_sa + n_la]."""
  head_dim = q.shape[2]
  k = jnp.concatenate([k_ca, gather_window(k_sa, window_index), k_la],
                      axis=1)  # K̂_i
  valid = jnp.concatenate([
      jnp.ones(k_ca.shape[1], bool),
      jnp.repeat(window_valid, k_sa.shape[2]),
      jnp.ones(k_la.shape[1], bool),
  ])
  logits = jnp.einsum('hqd,hkd->hqk', q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(head_dim).astype(np.float32)
  # valid at the rank of logits: jax2onnx mis-batches a lower-rank mask.
  return jnp.where(valid[None, None], logits, -jnp.inf)


def frame_attention(q, k_ca, v_ca, k_sa, v_sa, window_index, window_valid,
                    k_la, v_la):
  """Attention of one frame i, equations (7) and (8).

  Args:
    q: [h, nq, d] queries of frame i ([cls_i, Q̂_i]).
    k_ca, v_ca: [h, n_ca, d] current-frame keys/values of frame i.
    k_sa, v_sa: [nt, h, n_sa, d] short-term keys/values of ALL frames.
    window_index, window_valid: [to-1] the neighbours of frame i.
    k_la, v_la: [h, n_la, d] long-term keys/values (shared by all frames).
  Returns:
    [h, nq, d]
  """
  logits = frame_logits(q, k_ca, k_sa, window_index, window_valid, k_la)
  v = jnp.concatenate([v_ca, gather_window(v_sa, window_index), v_la],
                      axis=1)  # V̂_i
  # Softmax in float32, normalised after the product with V: one division
  # per output value instead of one per key.
  peak = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  weights = jnp.exp(logits - peak)  # [h, nq, nk]
  out = jnp.einsum('hqk,hkd->hqd', weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / weights.sum(axis=-1, keepdims=True)).astype(v.dtype)


def xla_attention(q, k_cur, v_cur, k_sa, v_sa, window_index, window_valid,
                  k_la, v_la):
  """`frame_attention` of every clip and frame: arguments as there with
  leading [B, nt] (K_SA, V_SA: [B, nt, ...]; K_LA, V_LA: [B, h, n_la, d];
  the window table [nt, to-1]). Returns [B, nt, h, nq, d]."""
  per_frame = jax.vmap(frame_attention,  # over frames: SA and LA shared
                       in_axes=(0, 0, 0, None, None, 0, 0, None, None))
  per_clip = jax.vmap(per_frame,  # over clips: the window table shared
                      in_axes=(0, 0, 0, 0, 0, None, None, 0, 0))
  return per_clip(q, k_cur, v_cur, k_sa, v_sa, window_index, window_valid,
                  k_la, v_la)
