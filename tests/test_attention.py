"""STA against a naive frame-by-frame reference, and its window invariances."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from stat_jax import attention as sta_lib
from stat_jax.attention import (ATTENTION_SETS, ShrinkingTemporalAttention,
                                window_table)

NT, GRID, DIM, HEADS = 6, (4, 4), 16, 2


def test_window_table_hand_worked():
  index, valid = window_table(nt=5, window=5)
  # Frame 0: neighbours -2, -1 (outside), 1, 2. Frame 3: 1, 2, 4, 5 (outside).
  np.testing.assert_array_equal(valid[0], [False, False, True, True])
  np.testing.assert_array_equal(index[0][valid[0]], [1, 2])
  np.testing.assert_array_equal(valid[3], [True, True, True, False])
  np.testing.assert_array_equal(index[3][valid[3]], [1, 2, 4])
  for nt, window in itertools.product((1, 4, 8), (3, 5, 7, 9)):
    index, valid = window_table(nt, window)
    for i in range(nt):
      neighbours = set(index[i][valid[i]].tolist())
      assert i not in neighbours  # never the frame itself
      half = window // 2
      assert neighbours == {j for j in range(i - half, i + half + 1)
                            if j != i and 0 <= j < nt}  # never wrapped


def make_sta(attention, window, q_stride, num_summary, seed=0, impl='xla',
             dtype=jnp.float32):
  return ShrinkingTemporalAttention(
      DIM, HEADS, q_stride=q_stride, kv_stride=2, attention=attention,
      window=window, num_summary=num_summary, pool_kernel=3, sa_pool=2,
      qkv_bias=True, dtype=dtype, rngs=nnx.Rngs(seed),
      attention_impl=impl)


def avg_pool_same(x, size):
  """Reference 2D mean pool with 'SAME' padding, pads not counted. x [h, w, c]."""
  h, w, _ = x.shape
  out_h, out_w = -(-h // size), -(-w // size)
  pad_h, pad_w = (out_h - 1) * size + size - h, (out_w - 1) * size + size - w
  top, left = pad_h // 2, pad_w // 2
  rows = []
  for a in range(out_h):
    row = []
    for b in range(out_w):
      r0, c0 = a * size - top, b * size - left
      window = x[max(r0, 0):min(r0 + size, h), max(c0, 0):min(c0 + size, w)]
      row.append(window.reshape(-1, x.shape[-1]).mean(0))
    rows.append(row)
  return np.array(rows)


def naive_sta(sta, x, grid, num_summary):
  """STA built the slow way: per frame, list the keys by hand (eqs. 1-8)."""
  x = np.asarray(x, np.float64)
  batch, nt, tokens, dim = x.shape
  heads, head_dim = sta.heads, dim // sta.heads
  w = np.asarray(sta.qkv.kernel[...], np.float64)
  b = np.asarray(sta.qkv.bias[...], np.float64)
  qkv = (x @ w + b).reshape(batch, nt, tokens, 3, heads, head_dim)
  qkv = jnp.asarray(np.moveaxis(qkv, (3, 4), (0, 3)), jnp.float32)
  q, k, v = qkv[0], qkv[1], qkv[2]  # [B, nt, h, N, d]
  if sta.pool_q is not None:
    q, _ = sta.pool_q(q, grid, num_summary)
  k, kv_grid = sta.pool_k(k, grid, num_summary)
  v, _ = sta.pool_v(v, grid, num_summary)
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  half = sta.window // 2
  out = np.zeros(q.shape)
  for n in range(batch):
    for i in range(nt):
      for h in range(heads):
        keys, values = [], []
        patch_k, patch_v = k[n, i, h, num_summary:], v[n, i, h, num_summary:]
        keys += list(patch_k)  # K_CA of frame i
        values += list(patch_v)
        if 'sa' in sta.attention:
          for j in range(i - half, i + half + 1):
            if j == i or not 0 <= j < nt:
              continue
            for tensor, dest in ((k, keys), (v, values)):
              frame = tensor[n, j, h, num_summary:].reshape(*kv_grid, head_dim)
              dest += list(avg_pool_same(frame, sta.sa_pool).reshape(-1, head_dim))
        if 'la' in sta.attention:
          for j in range(nt):
            if num_summary:
              keys.append(k[n, j, h, 0])
              values.append(v[n, j, h, 0])
            else:
              keys.append(k[n, j, h].mean(0))
              values.append(v[n, j, h].mean(0))
        # Without LA no class-token key: K̂_i = K_CA_i (+ K_SA), eq. (7).
        keys, values = np.array(keys), np.array(values)
        logits = q[n, i, h] @ keys.T / np.sqrt(head_dim)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[n, i, h] = weights @ values
  out = np.moveaxis(out, 2, 3).reshape(batch, nt, -1, dim)
  pw = np.asarray(sta.proj.kernel[...], np.float64)
  return out @ pw + np.asarray(sta.proj.bias[...], np.float64)


CASES = [
    (attention, window, q_stride, 1)
    for attention in ATTENTION_SETS for window in (3, 5) for q_stride in (1, 2)
] + [('ca+sa+la', 7, 1, 1), ('ca+sa+la', 3, 2, 0), ('ca+la', 5, 1, 0),
     ('ca+sa', 3, 1, 0)]


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
  """jax.nn.dot_product_attention's 'cudnn' answered by its 'xla' path on
  the same packed inputs (no GPU here): checks the packing, not cuDNN."""
  original = jax.nn.dot_product_attention
  calls = []

  def emulated(*args, implementation=None, **kwargs):
    calls.append(implementation)
    return original(*args, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', emulated)
  return calls


@pytest.mark.parametrize('impl', ['xla', 'cudnn', 'auto'])
@pytest.mark.parametrize('attention,window,q_stride,num_summary', CASES)
def test_sta_matches_naive_reference(attention, window, q_stride, num_summary,
                                     impl, cudnn_on_cpu):
  sta = make_sta(attention, window, q_stride, num_summary, impl=impl)
  tokens = num_summary + GRID[0] * GRID[1]
  x = jax.random.normal(jax.random.key(1), (2, NT, tokens, DIM))
  got, grid = sta(x, GRID)
  assert grid == (GRID[0] // q_stride, GRID[1] // q_stride)
  np.testing.assert_allclose(got, naive_sta(sta, x, GRID, num_summary),
                             rtol=1e-4, atol=1e-5)
  assert cudnn_on_cpu == (['cudnn'] if impl == 'cudnn' else [])


@pytest.mark.parametrize('impl', ['xla', 'cudnn'])
def test_bfloat16_attention_keeps_every_key_in_bfloat16(impl, monkeypatch):
  """All of Q, K_CA, K_SA, K_LA in the compute dtype (cuDNN refuses mixed
  dtypes, and one float32 part would promote the whole attention), and
  cuDNN gets even query and key lengths (it has no backward pass for odd
  ones under a padding mask; here 1 + 4*4 = 17 queries)."""
  seen = []
  original = jax.nn.dot_product_attention

  def recorded(query, key, value, *, implementation=None, **kwargs):
    seen.append((query.dtype, key.dtype, value.dtype,
                 query.shape[1] % 2, key.shape[1] % 2))
    return original(query, key, value, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', recorded)
  sta = make_sta('ca+sa+la', 3, 1, 1, impl=impl, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, NT, 1 + GRID[0] * GRID[1], DIM))
  got, _ = sta(x.astype(jnp.bfloat16), GRID)
  assert got.dtype == jnp.bfloat16
  assert seen == ([(jnp.bfloat16,) * 3 + (0, 0)] if impl == 'cudnn' else [])
  np.testing.assert_allclose(got.astype(np.float32),
                             naive_sta(sta, x, GRID, 1), atol=0.1)


def test_auto_is_the_xla_path_off_tpu_and_cpu(monkeypatch):
  resolve = sta_lib.resolve_attention_impl
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert resolve('auto') == 'xla'
  assert resolve('cudnn') == 'cudnn' and resolve('xla') == 'xla'


def frames_changed(sta, x, frame, token_slice):
  """Which frames' outputs move when frame `frame`'s tokens are perturbed."""
  base, _ = sta(x, GRID)
  bumped = x.at[:, frame, token_slice].add(1.0)
  moved, _ = sta(bumped, GRID)
  delta = np.abs(np.asarray(moved - base)).max(axis=(0, 2, 3))
  return {i for i in range(NT) if delta[i] > 1e-6}


@pytest.mark.parametrize('window', [3, 5])
def test_patch_tokens_reach_only_the_window(window):
  x = jax.random.normal(jax.random.key(2), (1, NT, 17, DIM))
  for attention in ('ca+sa', 'ca+sa+la'):
    sta = make_sta(attention, window, 1, 1)
    for j in range(NT):
      expected = {i for i in range(NT) if abs(i - j) <= window // 2}
      # Patch tokens of frame j: seen by frame j (CA) and its SA window only.
      assert frames_changed(sta, x, j, slice(1, None)) == expected


def test_class_tokens_reach_all_frames_only_through_la():
  x = jax.random.normal(jax.random.key(3), (1, NT, 17, DIM))
  j = 2
  with_la = make_sta('ca+la', 3, 1, 1)
  assert frames_changed(with_la, x, j, slice(0, 1)) == set(range(NT))
  without_la = make_sta('ca+sa', 3, 1, 1)  # SA uses patch tokens only
  assert frames_changed(without_la, x, j, slice(0, 1)) == {j}
  ca_only = make_sta('ca', 3, 1, 1)
  assert frames_changed(ca_only, x, j, slice(None)) == {j}


@pytest.mark.parametrize('attention', ['ca', 'ca+sa'])
def test_without_la_no_query_attends_a_class_token(attention):
  """Paper eq. (7) with K_LA left out: K̂_i = K_CA_i (+ K_SA), the pooled
  patch tokens; the class token's key is a key only through K_LA. So the
  patch outputs do not depend on any class token, and the class-token
  output of frame i only on its own query."""
  x = jax.random.normal(jax.random.key(4), (1, NT, 17, DIM))
  sta = make_sta(attention, 3, 1, 1)
  base, _ = sta(x, GRID)
  moved, _ = sta(x.at[:, :, 0].add(1.0), GRID)  # every frame's class token
  np.testing.assert_array_equal(moved[:, :, 1:], base[:, :, 1:])
  assert (np.abs(np.asarray(moved[:, :, 0] - base[:, :, 0])).max(axis=-1) > 1e-6).all()


@pytest.mark.parametrize('layout', ['products', 'fused_product'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_head_layouts_give_the_same_values_and_gradients(dtype, layout):
  """split_heads / merge_heads with the heads laid out by the products (no
  transposes for XLA to copy) against the projected tokens transposed: to
  float32 rounding; in bfloat16 bit-equal, except the input gradient of
  'products', which sums three rounded products (Q's, K's and V's) where
  the others round one: there they agree to one bfloat16 step."""
  qkv = nnx.Linear(DIM, 3 * DIM, dtype=dtype, rngs=nnx.Rngs(0))
  proj = nnx.Linear(DIM, DIM, dtype=dtype, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (2, NT, 1 + GRID[0] * GRID[1], DIM))
  attend = lambda q, k, v: jnp.tanh(q * k) + v  # any per-head function

  def forward(layout):
    return lambda qkv, proj, x: sta_lib.merge_heads(
        proj, attend(*sta_lib.split_heads(qkv, x, HEADS, layout)), layout)

  def loss(layout):
    return lambda qkv, proj, x: jnp.sum(
        forward(layout)(qkv, proj, x).astype(jnp.float32) ** 2)

  exact = dtype == jnp.bfloat16
  np.testing.assert_allclose(
      forward(layout)(qkv, proj, x).astype(np.float32),
      forward('transposed')(qkv, proj, x).astype(np.float32),
      rtol=0 if exact else 1e-6, atol=0 if exact else 1e-5)
  grads = [nnx.grad(loss(each), argnums=(0, 1, 2))(qkv, proj, x)
           for each in (layout, 'transposed')]
  *param_grads, x_grads = zip(*map(jax.tree.leaves, grads))
  for got, want in param_grads:
    np.testing.assert_allclose(np.float32(got), np.float32(want),
                               rtol=0 if exact else 1e-5,
                               atol=0 if exact else 1e-4)
  got, want = map(np.float32, x_grads)
  bf16_step = 2.0 ** (np.floor(np.log2(np.abs(want).max())) - 7)
  np.testing.assert_allclose(
      got, want, rtol=0 if exact else 1e-5,
      atol=(bf16_step if layout == 'products' else 0) if exact else 1e-4)


def test_transposed_heads_are_the_projection_split_by_hand():
  """The 'transposed' layout against the projection written out: channel
  t*C + h*d + j of Fq/Fk/Fv is element j of head h of q, k or v (t = 0, 1,
  2); the output projection reads head h's d values at channels h*d.."""
  qkv = nnx.Linear(DIM, 3 * DIM, rngs=nnx.Rngs(0))
  proj = nnx.Linear(DIM, DIM, rngs=nnx.Rngs(1))
  x = np.asarray(jax.random.normal(jax.random.key(2), (1, 2, 3, DIM)))
  projected = x @ np.asarray(qkv.kernel[...]) + np.asarray(qkv.bias[...])
  head_dim = DIM // HEADS
  q, k, v = sta_lib.split_heads(qkv, x, HEADS, 'transposed')
  for t, got in enumerate((q, k, v)):
    for h in range(HEADS):
      want = projected[..., t * DIM + h * head_dim:t * DIM + (h + 1) * head_dim]
      np.testing.assert_allclose(got[:, :, h], want, rtol=1e-5, atol=1e-6)
  heads = np.asarray(q)  # [1, 2, h, 3, d]
  concatenated = np.concatenate([heads[:, :, h] for h in range(HEADS)], -1)
  np.testing.assert_allclose(
      sta_lib.merge_heads(proj, heads, 'transposed'),
      concatenated @ np.asarray(proj.kernel[...]) + np.asarray(proj.bias[...]),
      rtol=1e-5, atol=1e-5)


def test_auto_head_layout_follows_the_platform(monkeypatch):
  resolve = sta_lib.resolve_head_layout
  assert resolve('auto', 'cpu') == 'transposed'
  assert resolve('auto', 'gpu') == 'fused_product'
  assert resolve('auto', 'tpu') == 'products'
  assert resolve('products', 'cpu') == 'products'
  assert resolve('transposed', 'tpu') == 'transposed'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert resolve('auto') == 'products'
