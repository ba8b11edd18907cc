"""STA attention implementation 'pallas': equations (7)-(8) in fused Pallas
kernels (stat_jax/kernels/sta_attention.py), Mosaic kernels on a TPU and
interpreted on the CPU (slow: for tests). The kernels read K_CA_i where the
pooling wrote it, class token included and masked, and K_SA of the whole
clip, picking each frame's window in VMEM: no K̂_i is built in memory.
"""

from stat_jax.kernels import sta_attention


def pallas_attention(q, k, v, k_sa, v_sa, window_index, window_valid, k_la,
                     v_la, *, num_summary: int):
  """Equations (7)-(8) for a batch of clips.

  Args:
    q: [B, nt, h, nq, d] queries.
    k, v: [B, nt, h, num_summary + n_ca, d] pooled keys/values, class
      token first (masked: a class token is a key only through K_LA).
    k_sa, v_sa: [B, nt, h, n_sa, d] (n_sa = 0 without SA);
    window_index, window_valid: [nt, to-1] (to-1 = 0 without SA);
    k_la, v_la: [B, h, n_la, d] (n_la = 0 without LA): the sets of
      attention.attention_sets.
  Returns:
    [B, nt, h, nq, d]
  """
  layout = sta_attention.make_layout(q.shape[3], num_summary, window_index,
                                     window_valid, long_term=k_la.shape[2] > 0)
  return sta_attention.sta_attention(q, k, v, k_sa, v_sa, k_la, v_la, layout)
