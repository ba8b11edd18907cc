"""Mixup and CutMix of video clips on device, as timm's `Mixup(mode='batch')`.

Every clip is mixed with a partner clip of another video (`partner_fn`),
never with itself nor with a repeated-augment twin (data.repeated_augment:
the k clips of a video side by side). It runs on each device's part of the
batch (train_step.py), and the partner is found where it costs least:

  each device holds >= 2 videos: the partner is on the same device, the
      clip half of its videos ahead (a roll of its clips; no communication);
  each device holds 1 video or part of one (clips per device <= k): the
      partner is the same row of the device holding the next video, sent
      by one collective permute of the clips and targets per step.

The clips per device and k must divide one another (checks/config.py, check_batch_on_mesh),
so that every device is in the same case; with mixup off nothing is sent.
One lam ~ Beta(alpha, alpha) serves the whole batch, and so does the CutMix
box, which is the same in every frame of a clip. Targets are label-smoothed
one-hot vectors mixed with the same lam.

The alphas and probabilities are Python floats from `config.mixup` (static
under jit); every random choice is a traced value, so one compiled step covers
mixup, CutMix and no mixing.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from stat_jax.checks.errors import UserError


def mixes(mix_config) -> bool:
  """Whether config.mixup mixes clips at all (else no partner is needed)."""
  return _mixes(mix_config.mixup_alpha, mix_config.cutmix_alpha,
                mix_config.prob)


def _mixes(mixup_alpha: float, cutmix_alpha: float, prob: float) -> bool:
  return (mixup_alpha > 0 or cutmix_alpha > 0) and prob > 0


def check_pairing(clips_per_device: int, clips_per_video: int) -> None:
  """UserError unless every device holds whole videos or a whole share of
  one: the two counts divide one another."""
  if clips_per_device % clips_per_video and clips_per_video % clips_per_device:
    raise UserError(
        f'mixup: each device holds {clips_per_device} clips and a video gives '
        f'data.repeated_augment = {clips_per_video}; one must divide the '
        'other to pair every clip with another video (change batch_size or '
        'data.repeated_augment)')


def partner_fn(clips_per_device: int, clips_per_video: int, devices: int = 1,
               axis_name=None) -> Callable[[jax.Array], jax.Array]:
  """fn(x [b, ...]) -> [b, ...]: row j of a device's clips (or targets) ->
  its partner's row, a clip of another video (module doc). `devices` that
  hold the batch in order along `axis_name` (a shard_map axis); 1: the
  whole batch is here."""
  check_pairing(clips_per_device, clips_per_video)
  videos_here = clips_per_device // clips_per_video
  if videos_here >= 2:
    shift = clips_per_video * (videos_here // 2)
    return lambda x: jnp.roll(x, -shift, axis=0)  # row j <- row j + shift
  hop = clips_per_video // clips_per_device  # devices that share a video
  if devices < 2 * hop:
    raise UserError(
        f'mixup needs two videos in the batch; it holds '
        f'{devices * clips_per_device // clips_per_video} (batch_size / '
        'data.repeated_augment)')
  sources = [((device + hop) % devices, device) for device in range(devices)]
  return lambda x: jax.lax.ppermute(x, axis_name, sources)


def smooth_one_hot(labels: jax.Array, num_classes: int,
                   smoothing: float) -> jax.Array:
  """labels [B] int -> [B, K] float32 with off = smoothing / K on the other
  classes and on = 1 - smoothing + off on the label (timm)."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return off + (on - off) * one_hot


def _beta(rng: jax.Array, uniforms: jax.Array, alpha: float) -> jax.Array:
  """lam ~ Beta(alpha, alpha); 1 (no mixing) when alpha is 0. Above 1/2
  from the two `uniforms` [2] by symmetric_beta, a fixed few element-wise
  ops; at or below it by jax.random.beta from `rng`, which draws two Gammas
  by rejection (while loops of many small kernels in every step)."""
  if alpha <= 0:
    return jnp.float32(1.0)
  if alpha <= 0.5:
    return jax.random.beta(rng, alpha, alpha)
  return symmetric_beta(uniforms, alpha)


def symmetric_beta(uniforms: jax.Array, alpha: float) -> jax.Array:
  """A draw of Beta(alpha, alpha), alpha > 1/2, from two independent
  uniforms [..., 2] in [0, 1) (Ulrich's polar method): a point of the unit
  disc with density ~ (1 - r^2)^(alpha - 3/2) has a coordinate
  y = r cos(theta) with density ~ (1 - y^2)^(alpha - 1) on [-1, 1], so
  (1 + y) / 2 ~ Beta(alpha, alpha); its r^2 ~ Beta(1, alpha - 1/2) is
  drawn by inverting that CDF, theta is uniform."""
  if alpha <= 0.5:
    raise ValueError(f'symmetric_beta needs alpha > 1/2, got {alpha}')
  u_radius, u_angle = uniforms[..., 0], uniforms[..., 1]
  radius = jnp.sqrt(1.0 - u_radius ** (1.0 / (alpha - 0.5)))
  return 0.5 + 0.5 * radius * jnp.cos(2 * jnp.pi * u_angle)


def _box_span(centre: jax.Array, ratio: jax.Array, size: int) -> jax.Array:
  """[size] bool: a cut of int(size * ratio) pixels centred at pixel
  `centre`, clipped to the image (timm's rand_bbox along one axis)."""
  cut = jnp.floor(size * ratio).astype(jnp.int32)
  low = jnp.clip(centre - cut // 2, 0, size)
  high = jnp.clip(centre + cut // 2, 0, size)
  pixels = jnp.arange(size)
  return (pixels >= low) & (pixels < high)


def _cutmix_box(rng: jax.Array, lam: jax.Array, height: int,
                width: int) -> tuple[jax.Array, jax.Array]:
  """Box [H, W] bool with sides sqrt(1 - lam) of the image's, centred at a
  uniform pixel, and lam corrected to the box actually pasted: 1 - box
  area / image area."""
  centre_y, centre_x = jax.random.randint(rng, (2,), 0,
                                          jnp.array([height, width]))
  ratio = jnp.sqrt(1.0 - lam)
  box = (_box_span(centre_y, ratio, height)[:, None]
         & _box_span(centre_x, ratio, width)[None, :])  # [H, W]
  return box, 1.0 - box.mean()


def _mixing_weight(rng: jax.Array, height: int, width: int, *,
                   mixup_alpha: float, cutmix_alpha: float, prob: float,
                   switch_prob: float) -> tuple[jax.Array, jax.Array]:
  """Per-pixel weight [H, W] of the clip itself (1 - weight goes to the
  flipped clip) and the lam of its label: lam everywhere for mixup, 0 in the
  box and 1 outside for CutMix, 1 everywhere without mixing."""
  draw_rng, box_rng, mixup_rng, cutmix_rng = jax.random.split(rng, 4)
  # Every uniform of the step in one draw: each jax.random call hashes on
  # its own, and a hash of a few scalars is tens of kernels on a TPU.
  uniforms = jax.random.uniform(draw_rng, (6,))
  apply = uniforms[0] < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = uniforms[1] < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = _beta(mixup_rng, uniforms[2:4], mixup_alpha)
  box, lam_cutmix = _cutmix_box(
      box_rng, _beta(cutmix_rng, uniforms[4:6], cutmix_alpha), height, width)
  weight = jnp.where(use_cutmix, 1.0 - box.astype(jnp.float32), lam_mixup)
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
  return jnp.where(apply, weight, 1.0), jnp.where(apply, lam, 1.0)


def mixup_cutmix(rng: jax.Array, video: jax.Array, labels: jax.Array, *,
                 num_classes: int, mixup_alpha: float, cutmix_alpha: float,
                 prob: float, switch_prob: float, label_smoothing: float,
                 partner=None) -> tuple[jax.Array, jax.Array]:
  """Mixes each clip with its partner: video [B, T, H, W, C] float, labels
  [B] int -> (video [B, T, H, W, C], soft targets [B, K] float32).

  With probability `prob` the batch is mixed: by CutMix with probability
  `switch_prob` when both alphas are > 0, else by whichever alpha is > 0. An
  alpha of 0 disables that kind; both 0 gives the smoothed one-hot targets and
  the video unchanged. The keyword arguments are those of `config.mixup`
  plus `num_classes` and `partner` (partner_fn's; default: the whole batch
  here, one clip a video).
  """
  if not jnp.issubdtype(video.dtype, jnp.floating):
    raise TypeError(f'mixup needs a floating video, got {video.dtype}')
  targets = smooth_one_hot(labels, num_classes, label_smoothing)  # [B, K]
  if not _mixes(mixup_alpha, cutmix_alpha, prob):
    return video, targets
  partner = partner or partner_fn(video.shape[0], 1)
  height, width = video.shape[2:4]
  weight, lam = _mixing_weight(
      rng, height, width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      prob=prob, switch_prob=switch_prob)
  weight = weight[:, :, None]  # [H, W, 1], broadcast over B, T and C
  mixed = weight * video + (1.0 - weight) * partner(video)
  mixed_targets = lam * targets + (1.0 - lam) * partner(targets)
  return mixed.astype(video.dtype), mixed_targets
