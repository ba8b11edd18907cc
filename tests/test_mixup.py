"""Mixup / CutMix: targets, the pasted box, the blend, and the random choices
against their configured probabilities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from stat_jax import defaults
from stat_jax.checks.errors import UserError
from stat_jax.mixup import (_cutmix_box, check_pairing, mixup_cutmix,
                            partner_fn, smooth_one_hot, symmetric_beta)
from tests.conftest import run_on_cpu_devices

B, T, H, W, C, K = 4, 3, 16, 12, 2, 5
LABELS = jnp.array([0, 1, 3, 4])  # distinct, so lam is readable from targets
PARTNER = np.array([2, 3, 0, 1])  # of a batch of 4 clips of 4 videos
SMOOTHING = 0.1
OFF = SMOOTHING / K
ON = 1 - SMOOTHING + OFF


def distinct_video(batch=B):
  """float32 [batch, T, H, W, C] whose elements are all different."""
  return jnp.arange(batch * T * H * W * C, dtype=jnp.float32).reshape(
      batch, T, H, W, C)


def mix(seed, video=None, labels=LABELS, **overrides):
  kwargs = dict(num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
                switch_prob=0.5, label_smoothing=SMOOTHING)
  kwargs.update(overrides)
  video = distinct_video() if video is None else video
  return mixup_cutmix(jax.random.key(seed), video, labels, **kwargs)


def lam_from_targets(targets):
  """Clip 0's target is lam * on + (1 - lam) * off at its own label."""
  return (targets[0, LABELS[0]] - OFF) / (ON - OFF)


def test_smooth_one_hot_hand_computed():
  targets = smooth_one_hot(jnp.array([0, 2]), 4, 0.2)
  np.testing.assert_allclose(targets, [[0.85, 0.05, 0.05, 0.05],
                                       [0.05, 0.05, 0.85, 0.05]], rtol=1e-6)
  assert targets.dtype == jnp.float32
  np.testing.assert_array_equal(smooth_one_hot(jnp.array([1]), 3, 0.0),
                                [[0, 1, 0]])


@pytest.mark.parametrize('seed', range(6))
def test_target_rows_sum_to_one_and_mix_the_partner_label(seed):
  _, targets = mix(seed)
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  lam = lam_from_targets(targets)
  # Clip 0 is paired with clip 2: the rest of its mass is on that label.
  np.testing.assert_allclose(targets[0, LABELS[2]],
                             lam * OFF + (1 - lam) * ON, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(targets[2, LABELS[2]],
                             (1 - lam) * OFF + lam * ON, rtol=1e-5, atol=1e-6)


def test_both_alphas_zero_is_smoothed_one_hot_and_same_video():
  video, targets = mix(0, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(targets, smooth_one_hot(LABELS, K, SMOOTHING))
  np.testing.assert_array_equal(video, distinct_video())


def pasted(video, mixed):
  """bool [B, T, H, W, C]: elements of `mixed` taken from the partner clip;
  asserts every other element is the clip's own."""
  from_partner = np.asarray(mixed == video[PARTNER])
  from_self = np.asarray(mixed == video)
  assert (from_partner ^ from_self).all()  # each element is exactly one source
  return from_partner


@pytest.mark.parametrize('seed', range(8))
def test_cutmix_box_same_in_all_frames_and_clips_and_matches_lam(seed):
  video = distinct_video()
  mixed, targets = mix(seed, mixup_alpha=0.0)
  from_partner = pasted(video, mixed)
  box = from_partner[0, 0, :, :, 0]  # [H, W]
  np.testing.assert_array_equal(from_partner, np.broadcast_to(
      box[None, None, :, :, None], from_partner.shape))
  rows, cols = box.any(axis=1), box.any(axis=0)
  np.testing.assert_array_equal(box, rows[:, None] & cols[None, :])  # a box
  for span in (rows, cols):  # contiguous
    inside = np.flatnonzero(span)
    if inside.size:
      assert inside[-1] - inside[0] + 1 == inside.size
  np.testing.assert_allclose(lam_from_targets(targets), 1 - box.mean(),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('lam', [0.75, 0.36])
def test_cutmix_box_size_follows_timm_rand_bbox(lam):
  """timm: cut = int(side * sqrt(1 - lam)), box [centre - cut // 2,
  centre + cut // 2) clipped to the image; lam corrected to the box area."""
  height, width = 16, 12
  ratio = np.sqrt(1 - lam)
  full = [2 * (int(side * ratio) // 2) for side in (height, width)]
  sizes = set()
  for seed in range(30):
    box, corrected = _cutmix_box(jax.random.key(seed), lam, height, width)
    box = np.asarray(box)
    size = [box.any(axis=1).sum(), box.any(axis=0).sum()]
    inside = [not box[0].any() and not box[-1].any(),
              not box[:, 0].any() and not box[:, -1].any()]
    for axis in range(2):  # full size unless clipped at a border
      assert (size[axis] == full[axis] if inside[axis]
              else size[axis] <= full[axis])
    sizes.add(tuple(size))
    np.testing.assert_allclose(corrected, 1 - box.mean(), rtol=1e-6)
  assert tuple(full) in sizes


def test_cutmix_boxes_vary_and_some_are_clipped_at_the_border():
  boxes = [pasted(distinct_video(), mix(s, mixup_alpha=0.0)[0])[0, 0, :, :, 0]
           for s in range(20)]
  assert len({b.tobytes() for b in boxes}) > 10
  touching = [b[0].any() or b[-1].any() or b[:, 0].any() or b[:, -1].any()
              for b in boxes]
  assert any(touching)


@pytest.mark.parametrize('seed', range(6))
def test_mixup_blends_video_and_targets_by_the_same_lam(seed):
  video = distinct_video()
  mixed, targets = mix(seed, cutmix_alpha=0.0)
  lam = lam_from_targets(targets)
  assert 0 < lam < 1
  np.testing.assert_allclose(mixed, lam * video + (1 - lam) * video[PARTNER],
                             rtol=1e-5, atol=1e-2)  # pixels go up to ~1e4
  expected = (lam * smooth_one_hot(LABELS, K, SMOOTHING)
              + (1 - lam) * smooth_one_hot(LABELS[PARTNER], K, SMOOTHING))
  np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-6)


def test_odd_batch_mixes_every_clip_with_another():
  labels = jnp.array([0, 2, 4])
  video = distinct_video(3)
  for overrides in ({'cutmix_alpha': 0.0}, {'mixup_alpha': 0.0}):
    mixed, targets = mix(1, video, labels, **overrides)
    lam = (targets[0, 0] - OFF) / (ON - OFF)
    assert lam < 1
    for clip, partner in enumerate([1, 2, 0]):  # one clip ahead
      assert not np.allclose(mixed[clip], video[clip])
      np.testing.assert_allclose(targets[clip, labels[partner]],
                                 lam * OFF + (1 - lam) * ON, rtol=1e-5)


@pytest.mark.parametrize('clips, per_video, expected', [
    (8, 1, [4, 5, 6, 7, 0, 1, 2, 3]),  # half the videos ahead
    (3, 1, [1, 2, 0]),
    (6, 2, [2, 3, 4, 5, 0, 1]),  # 3 videos: one ahead
    (8, 2, [4, 5, 6, 7, 0, 1, 2, 3]),
])
def test_partner_of_each_clip_on_one_device(clips, per_video, expected):
  partner = partner_fn(clips, per_video)
  np.testing.assert_array_equal(partner(jnp.arange(clips)), expected)
  videos = np.arange(clips) // per_video
  assert (videos[np.array(expected)] != videos).all()


def test_pairings_that_cannot_work_are_refused():
  with pytest.raises(UserError, match='each device holds 6 clips and a video '
                     'gives data.repeated_augment = 4'):
    check_pairing(6, 4)
  with pytest.raises(UserError, match='mixup needs two videos in the batch; '
                     'it holds 1'):
    partner_fn(2, 2)  # one device, one video


PAIRS_SCRIPT = """
import json
import jax, jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stat_jax.mixup import partner_fn
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'fsdp'))
axes = ('data', 'fsdp')
found = {}
for per_device in (1, 2, 4):
  for per_video in (1, 2):
    batch = 4 * per_device
    partner = partner_fn(per_device, per_video, 4, axes)
    pair = jax.jit(jax.shard_map(partner, mesh=mesh, in_specs=P(axes),
                                 out_specs=P(axes)))
    rows = jnp.arange(batch)
    hlo = pair.lower(rows).compile().as_text()
    found[f'{per_device},{per_video}'] = {
        'partner': np.asarray(pair(rows)).tolist(),
        'collectives': [op for op in ('collective-permute', 'all-gather',
                        'all-to-all', 'all-reduce') if op in hlo]}
print(json.dumps(found))
"""


def test_mixup_pairs_on_4_devices_at_1_2_4_clips_per_device():
  """No clip meets itself or its repeated-augment twin; the partner is
  sent between devices (one collective permute) only when a device holds
  fewer than 2 videos."""
  found = run_on_cpu_devices(PAIRS_SCRIPT, 4)
  for per_device in (1, 2, 4):
    for per_video in (1, 2):
      case = found[f'{per_device},{per_video}']
      video = np.arange(4 * per_device) // per_video
      partner = np.array(case['partner'])
      assert (video[partner] != video).all(), (per_device, per_video, partner)
      local = per_device // per_video >= 2
      assert case['collectives'] == ([] if local else ['collective-permute'])
      if local:  # the partner is on the clip's own device
        assert (partner // per_device == np.arange(4 * per_device)
                // per_device).all()


def test_same_rng_same_output_and_jit_matches_eager():
  video = distinct_video()
  kwargs = dict(num_classes=K, **defaults.base_config(16, K).mixup)
  jitted = jax.jit(functools.partial(mixup_cutmix, **kwargs))
  for seed in range(4):
    rng = jax.random.key(seed)
    eager = mixup_cutmix(rng, video, LABELS, **kwargs)
    again = mixup_cutmix(rng, video, LABELS, **kwargs)
    compiled = jitted(rng, video, LABELS)
    for a, b, c in zip(eager, again, compiled):
      np.testing.assert_array_equal(a, b)
      np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-3)
  first = mixup_cutmix(jax.random.key(0), video, LABELS, **kwargs)[1]
  second = mixup_cutmix(jax.random.key(1), video, LABELS, **kwargs)[1]
  assert not np.allclose(first, second)


def test_bfloat16_video_keeps_its_dtype():
  video = distinct_video().astype(jnp.bfloat16)
  mixed, targets = mix(0, video)
  assert mixed.dtype == jnp.bfloat16 and targets.dtype == jnp.float32


def test_integer_video_is_refused():
  with pytest.raises(TypeError, match='floating'):
    mix(0, distinct_video().astype(jnp.uint8))


def test_random_choices_follow_prob_switch_prob_and_alphas():
  """Over many keys: how often the batch is mixed, how often by CutMix, and
  the variance of the mixup lam (Beta(a, a) has variance 1 / (4 (2a + 1)))."""
  video = jnp.stack([jnp.zeros((1, 32, 32, 1)), jnp.ones((1, 32, 32, 1))])
  labels = jnp.array([0, 1])
  mixup_alpha = 0.2  # variance 0.179; cutmix_alpha's Beta(1, 1) gives 0.083

  @jax.jit
  @jax.vmap
  def one(rng):
    return mixup_cutmix(rng, video, labels, num_classes=2,
                        mixup_alpha=mixup_alpha, cutmix_alpha=1.0, prob=0.7,
                        switch_prob=0.3, label_smoothing=0.0)

  mixed, targets = one(jax.random.split(jax.random.key(0), 4000))
  lam = np.asarray(targets[:, 0, 0])
  clip = np.asarray(mixed[:, 0]).reshape(len(lam), -1)  # 0 = own, 1 = other
  is_mixed = lam < 1
  is_cutmix = is_mixed & np.isin(clip, (0.0, 1.0)).all(axis=1)
  assert abs(is_mixed.mean() - 0.7) < 0.03
  assert abs(is_cutmix.sum() / is_mixed.sum() - 0.3) < 0.03
  np.testing.assert_allclose(clip[is_cutmix].mean(axis=1), 1 - lam[is_cutmix],
                             rtol=1e-5, atol=1e-6)  # pasted fraction
  is_mixup = is_mixed & ~is_cutmix
  np.testing.assert_allclose(clip[is_mixup] - (1 - lam[is_mixup][:, None]), 0,
                             atol=1e-6)
  expected_variance = 1 / (4 * (2 * mixup_alpha + 1))
  assert abs(lam[is_mixup].var() - expected_variance) < 0.012


@pytest.mark.parametrize('alpha', [0.8, 1.0, 2.5])
def test_symmetric_beta_follows_beta_alpha_alpha(alpha):
  """20,000 draws: a KS test against scipy's Beta(alpha, alpha) (the
  neighbouring alphas are rejected by the same test, so it can fail), and
  the mean 1/2 and variance 1 / (4 (2 alpha + 1)) by hand."""
  uniforms = jax.random.uniform(jax.random.key(0), (20_000, 2))
  lam = np.asarray(symmetric_beta(uniforms, alpha), dtype=np.float64)
  assert ((lam >= 0) & (lam <= 1)).all()
  assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf
                            ).pvalue > 0.01
  for wrong in (0.8 * alpha, 1.25 * alpha):
    assert scipy.stats.kstest(lam, scipy.stats.beta(wrong, wrong).cdf
                              ).pvalue < 1e-4
  assert abs(lam.mean() - 0.5) < 0.01
  np.testing.assert_allclose(lam.var(), 1 / (4 * (2 * alpha + 1)), rtol=0.03)


def test_symmetric_beta_hand_worked_and_refuses_alpha_at_most_half():
  """u_angle 0 gives (1 + r) / 2, 1/4 gives 1/2; alpha 1.5: r = sqrt(1 - u)."""
  lam = symmetric_beta(jnp.array([[0.64, 0.0], [0.3, 0.25], [0.0, 0.5]]), 1.5)
  np.testing.assert_allclose(lam, [0.8, 0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match='alpha > 1/2'):
    symmetric_beta(jnp.zeros(2), 0.5)
