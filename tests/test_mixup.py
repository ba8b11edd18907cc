"""Mixup / CutMix: targets, the pasted box, the blend, and the random choices
against their configured probabilities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stat_jax import defaults
from stat_jax.mixup import (_cutmix_box, flip_shards, mixup_cutmix,
                            smooth_one_hot)
from tests.conftest import run_on_cpu_devices

B, T, H, W, C, K = 4, 3, 16, 12, 2, 5
LABELS = jnp.array([0, 1, 3, 4])  # distinct, so lam is readable from targets
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
def test_target_rows_sum_to_one_and_mix_the_flipped_label(seed):
  _, targets = mix(seed)
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  lam = lam_from_targets(targets)
  # Clip 0 is paired with clip B - 1: the rest of its mass is on that label.
  np.testing.assert_allclose(targets[0, LABELS[-1]],
                             lam * OFF + (1 - lam) * ON, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(targets[-1, LABELS[-1]],
                             (1 - lam) * OFF + lam * ON, rtol=1e-5, atol=1e-6)


def test_both_alphas_zero_is_smoothed_one_hot_and_same_video():
  video, targets = mix(0, mixup_alpha=0.0, cutmix_alpha=0.0)
  np.testing.assert_array_equal(targets, smooth_one_hot(LABELS, K, SMOOTHING))
  np.testing.assert_array_equal(video, distinct_video())


def pasted(video, mixed):
  """bool [B, T, H, W, C]: elements of `mixed` taken from the flipped clip;
  asserts every other element is the clip's own."""
  from_flip = np.asarray(mixed == jnp.flip(video, axis=0))
  from_self = np.asarray(mixed == video)
  assert (from_flip ^ from_self).all()  # each element is exactly one source
  return from_flip


@pytest.mark.parametrize('seed', range(8))
def test_cutmix_box_same_in_all_frames_and_clips_and_matches_lam(seed):
  video = distinct_video()
  mixed, targets = mix(seed, mixup_alpha=0.0)
  from_flip = pasted(video, mixed)
  box = from_flip[0, 0, :, :, 0]  # [H, W]
  np.testing.assert_array_equal(from_flip, np.broadcast_to(
      box[None, None, :, :, None], from_flip.shape))
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
  np.testing.assert_allclose(mixed, lam * video + (1 - lam) * video[::-1],
                             rtol=1e-5, atol=1e-2)  # pixels go up to ~1e4
  expected = (lam * smooth_one_hot(LABELS, K, SMOOTHING)
              + (1 - lam) * smooth_one_hot(LABELS[::-1], K, SMOOTHING))
  np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-6)


def test_odd_batch_middle_clip_meets_itself():
  labels = jnp.array([0, 2, 4])
  video = distinct_video(3)
  for overrides in ({'cutmix_alpha': 0.0}, {'mixup_alpha': 0.0}):
    mixed, targets = mix(1, video, labels, **overrides)
    np.testing.assert_allclose(mixed[1], video[1], rtol=1e-6)
    np.testing.assert_allclose(targets[1], smooth_one_hot(labels, K,
                                                          SMOOTHING)[1],
                               rtol=1e-5)


def test_flip_shards_reverses_each_part():
  np.testing.assert_array_equal(flip_shards(jnp.arange(8), 1),
                                [7, 6, 5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(flip_shards(jnp.arange(8), 2),
                                [3, 2, 1, 0, 7, 6, 5, 4])
  np.testing.assert_array_equal(flip_shards(jnp.arange(6), 3),
                                [1, 0, 3, 2, 5, 4])


@pytest.mark.parametrize('seed', range(4))
def test_each_shard_is_mixed_as_a_batch_of_its_own(seed):
  """shards=2 mixes each half exactly as mixing that half alone with the
  same key (one lam and box per step); shards=1 is the whole-batch flip."""
  video, labels = distinct_video(8), jnp.array([0, 1, 2, 3, 4, 0, 1, 2])
  halves = [mix(seed, video[part], labels[part])
            for part in (slice(0, 4), slice(4, 8))]
  mixed, targets = mix(seed, video, labels, shards=2)
  np.testing.assert_array_equal(mixed, jnp.concatenate([h[0] for h in halves]))
  np.testing.assert_array_equal(targets,
                                jnp.concatenate([h[1] for h in halves]))
  whole = mix(seed, video, labels, shards=1)
  mixed_flip = mix(seed, video[::-1], labels[::-1], shards=1)
  np.testing.assert_array_equal(whole[0][::-1], mixed_flip[0])


def test_shards_must_divide_the_batch():
  with pytest.raises(ValueError, match='3 shards'):
    mix(0, distinct_video(4), shards=3)


def test_sharded_batch_mixes_without_moving_clips_between_devices():
  """Compiled for a batch split over 4 devices, mixup of each device's
  part sends no clip to another device (no collective in the program)."""
  found = run_on_cpu_devices("""
import json
import jax, jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from stat_jax.mixup import mixup_cutmix
mesh = Mesh(np.array(jax.devices()), ('batch',))
clips = NamedSharding(mesh, P('batch'))
mix = jax.jit(lambda rng, video, labels: mixup_cutmix(
    rng, video, labels, num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0,
    prob=1.0, switch_prob=0.5, label_smoothing=0.1, shards=4),
    in_shardings=(None, clips, clips), out_shardings=(clips, clips))
hlo = mix.lower(jax.random.key(0), jax.ShapeDtypeStruct((8, 3, 16, 12, 2),
    jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32)).compile().as_text()
print(json.dumps([op for op in ('collective-permute', 'all-gather',
    'all-to-all', 'all-reduce') if op in hlo]))
""", 4)
  assert found == []


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
