"""The model against the paper's numbers: GMACs of Tables 1, 2, 6 and 7,
Table 5's cost-matched stems, the token / K_CA / K_SA grid of every block,
the SA pooling, and parameter counts by hand.

Everything is traced abstractly (nnx.eval_shape, jax.make_jaxpr): nothing
full-size is compiled or run. The paper's numbers are copied here by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import k400, ssv2
from stat_jax import attention as sta_lib
from stat_jax import flops

PAPER_TOLERANCE = 0.03
STEM_TOLERANCE = 0.05


def config_of(dataset: str, frames: int, **model):
  config = (k400 if dataset == 'k400' else ssv2).get_config(str(frames))
  for key, value in model.items():
    config.model[key] = value
  return config


_COSTS = {}


def cost(dataset: str, frames: int, **model) -> tuple[int, int]:
  """(multiply-adds per view, parameters), traced once per configuration
  (overrides equal to a default share the trace)."""
  config = config_of(dataset, frames, **model)
  key = config.to_json()
  if key not in _COSTS:
    _COSTS[key] = flops.model_cost(config)
  return _COSTS[key]


# (dataset, T, model overrides, the paper's GFLOPs for one view). Tables 6
# and 7 give GFLOPs x views: K400 5 x 1 views at T = 16, 32 and 3 x 3 at 64;
# SSv2 1 x 3.
PAPER_ROWS = [
    ('k400', 16, {'attention': 'ca'}, 58.2),  # Table 1
    ('k400', 16, {'attention': 'ca+sa'}, 59.0),
    ('k400', 16, {'attention': 'ca+la'}, 58.4),
    ('k400', 16, {'attention': 'ca+sa+la'}, 59.1),
    ('k400', 32, {'window': 3}, 118.6),  # Table 2
    ('k400', 32, {'window': 5}, 120.1),
    ('k400', 32, {'window': 7}, 121.5),
    ('k400', 32, {'window': 9}, 123.0),
    ('k400', 16, {}, 296 / 5),  # Table 6
    ('k400', 32, {}, 601 / 5),
    ('k400', 64, {}, 2172 / 9),
    ('ssv2', 16, {}, 178 / 3),  # Table 7
    ('ssv2', 32, {}, 361 / 3),
    ('ssv2', 64, {}, 724 / 3),
]


@pytest.mark.parametrize('dataset,frames,model,paper', PAPER_ROWS)
def test_gmacs_of_the_papers_rows(dataset, frames, model, paper):
  macs, _ = cost(dataset, frames, **model)
  assert macs / 1e9 == pytest.approx(paper, rel=PAPER_TOLERANCE)


def test_table5_stems_keep_cost_and_parameters():
  """'we replace part of previous transformer blocks with convolutional
  blocks while ensuring that computational overhead and numbers of
  parameters remain approximately the same' (Table 5, T = 16)."""
  costs = [cost('k400', 16, stem_layers=n) for n in (1, 3, 5)]
  for macs, params in costs:
    assert macs == pytest.approx(costs[1][0], rel=STEM_TOLERANCE)
    assert params == pytest.approx(costs[1][1], rel=STEM_TOLERANCE)


# K400 STAT-16 at 224²: per STA block, the side of the token grid it takes
# and gives, of K_CA (= V_CA) and of K_SA. The 3-layer stem gives 28x28 at
# 1/8; blocks are MViT-B's without its first stage ([2, 11, 2]); Q is pooled
# by 2 at the first block of stages 2 and 3. MViT-B's K/V stride is 8 at 1/4
# resolution, halved at each Q pooling, and applied to the block's input:
# 28/4 = 7, but 28/2 = 14 and 14/1 = 14 at the two transition blocks.
# K_SA: 2x2 average pool of K_CA ('SAME'), 7 -> 4 and 14 -> 7.
K400_16_GRIDS = (
    [(28, 28, 7, 4)] * 2  # stage 1 (192 wide; the second widens to 384)
    + [(28, 14, 14, 7)]  # transition: Q 28 -> 14, K/V stride 2
    + [(14, 14, 7, 4)] * 10  # stage 2 (384; the last widens to 768)
    + [(14, 7, 14, 7)]  # transition: Q 14 -> 7, K/V stride 1
    + [(7, 7, 7, 4)]  # stage 3 (768)
)


def test_token_kca_and_ksa_grid_of_every_block(monkeypatch):
  config = config_of('k400', 16)
  seen = []
  original = sta_lib.shrinking_temporal_attention

  def recorded(q, k, v, k_sa, v_sa, **kwargs):
    seen.append((q.shape[3], k.shape[3], k_sa.shape[3]))
    return original(q, k, v, k_sa, v_sa, **kwargs)

  monkeypatch.setattr(sta_lib, 'shrinking_temporal_attention', recorded)
  graphdef, state = nnx.split(flops.abstract_model(config))
  video = jax.ShapeDtypeStruct((1, 16, 224, 224, 3), jnp.float32)

  tokens = []  # tokens per frame entering each block

  def trace(state, video):
    model = nnx.merge(graphdef, state)
    x, grid = model.tokens(video)
    for block in model.blocks:
      tokens.append(x.shape[2])
      x, grid = block(x, grid)
    return x

  jax.eval_shape(trace, state, video)
  side = lambda n: int(round(np.sqrt(n)))  # pylint: disable=unnecessary-lambda-assignment
  got = [(side(t - 1), side(q - 1), side(k - 1), side(sa))
         for t, (q, k, sa) in zip(tokens, seen)]
  assert got == K400_16_GRIDS
  assert all(q - 1 == side(q - 1) ** 2 for q, _, _ in seen)  # square grids


def test_sa_pooling_of_a_7x7_grid_by_hand():
  """P_SA: 2x2 average pool, 'SAME' padding, pads not counted: 7 -> 4
  windows per axis, rows / columns {0,1}, {2,3}, {4,5}, {6}."""
  grid = np.arange(49, dtype=np.float32).reshape(7, 7)  # value 7 r + c
  x = jnp.asarray(grid).reshape(1, 1, 1, 49, 1)  # [B, nt, h, nh*nw, d]
  pooled = sta_lib.short_term_pool(x, (7, 7), 2).reshape(4, 4)
  # Window means: rows 0.5, 2.5, 4.5, 6 (x 7) plus columns 0.5, 2.5, 4.5, 6.
  expected = np.array([[4.0, 6.0, 8.0, 9.5],
                       [18.0, 20.0, 22.0, 23.5],
                       [32.0, 34.0, 36.0, 37.5],
                       [42.5, 44.5, 46.5, 48.0]])
  np.testing.assert_array_equal(np.asarray(pooled), expected)


# Parameters by hand.


def conv_params(c_in, c_out, kernel=27):
  return kernel * c_in * c_out + c_out


def stem_params(widths, kernels):
  """Conv3d layers, LayerNorm (scale, bias) between them."""
  count = sum(conv_params(a, b, k) for a, b, k in
              zip((3, *widths), widths, kernels))
  return count + sum(2 * w for w in widths[:-1])


def block_params(dim, dim_out, heads, q_pool):
  head_dim = dim // heads
  pool = 9 * head_dim + 2 * head_dim  # depthwise 3x3 conv (no bias) + LayerNorm
  count = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim)  # LN, qkv, proj
  count += pool * (3 if q_pool else 2) + 2 * dim  # P_Q?, P_K, P_V; LN
  count += dim * 4 * dim + 4 * dim + 4 * dim * dim_out + dim_out  # MLP
  if dim_out != dim:  # projected skip
    count += dim * dim_out + dim_out
  return count


STAGE1 = [(192, 192, 2, False), (192, 384, 2, False)]
STAGE2 = [(384, 384, 4, True)] + [(384, 384, 4, False)] * 9 + [(384, 768, 4, False)]
STAGE3 = [(768, 768, 8, True), (768, 768, 8, False)]
# stem widths, kernel volumes, tokens per frame, frames divisor, blocks
STEMS = {
    1: ((96,), (3 * 7 * 7,), 56 * 56, 2,
        [(96, 192, 1, False), (192, 192, 2, True), (192, 384, 2, False)]
        + STAGE2 + STAGE3),
    3: ((64, 96, 192), (27,) * 3, 28 * 28, 2, STAGE1 + STAGE2 + STAGE3),
    5: ((144, 256, 512, 512, 768), (27,) * 5, 7 * 7, 4,
        [(768, 768, 8, False)] * 2),
}


def params_by_hand(frames, classes, stem=3, lta=1):
  widths, kernels, patches, divisor, blocks = STEMS[stem]
  c0, c = widths[-1], 768
  count = stem_params(widths, kernels)
  count += c0 + (1 + patches) * c0 + frames // divisor * c0  # cls, pos s / t
  count += sum(block_params(*b) for b in blocks)
  count += c + lta * (2 * c + 4 * c * c + 4 * c)  # video cls; LN + MHSA each
  return count + 2 * c + c * classes + classes  # LayerNorm, classifier


@pytest.mark.parametrize('dataset,frames,model,classes', [
    ('k400', 16, {}, 400),
    ('k400', 32, {}, 400),
    ('k400', 64, {}, 400),
    ('ssv2', 16, {}, 174),
    ('k400', 16, {'stem_layers': 1}, 400),
    ('k400', 16, {'stem_layers': 5}, 400),
    ('k400', 16, {'lta': 0}, 400),
    ('k400', 16, {'lta': 4}, 400),
])
def test_parameter_count_by_hand(dataset, frames, model, classes):
  _, params = cost(dataset, frames, **model)
  expected = params_by_hand(frames, classes, model.get('stem_layers', 3),
                            model.get('lta', 1))
  assert params == expected
