"""The pictures of explain, evaluation and long-video predict (matplotlib,
Agg: no display). Each *_figure returns a Figure; `save` writes it as PNG
and `to_image` turns it into uint8 [H, W, 3] for TensorBoard."""

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from stat_jax import storage  # pylint: disable=g-import-not-at-top,wrong-import-position

SHARE_NAMES = ('CA', 'SA', 'LA')


def save(fig, path: str) -> str:
  """Writes the picture to `path` (local or gs://); closes the figure."""
  with storage.local_copy_for_writing(path) as local:
    fig.savefig(local, dpi=fig.dpi)
  plt.close(fig)
  return path


def to_image(fig) -> np.ndarray:
  """uint8 [H, W, 3]; closes the figure."""
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return image


def confusion_figure(matrix, class_names=None):
  """Counts [C, C], row = true class, column = predicted."""
  matrix = np.asarray(matrix)
  size = len(matrix)
  names = class_names or [str(c) for c in range(size)]
  side = min(3 + 0.35 * size, 16)
  fig, ax = plt.subplots(figsize=(side + 1, side), dpi=80)
  shown = ax.imshow(matrix, cmap='Blues')
  fig.colorbar(shown, ax=ax, fraction=0.046, label='videos')
  if size <= 40:
    ax.set_xticks(range(size), names, rotation=90, fontsize=7)
    ax.set_yticks(range(size), names, fontsize=7)
  if size <= 20:
    for (t, p), count in np.ndenumerate(matrix):
      if count:
        ax.text(p, t, int(count), ha='center', va='center', fontsize=6,
                color='white' if count > matrix.max() / 2 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(f'confusion matrix ({int(matrix.sum())} videos)')
  fig.tight_layout()
  return fig


def frame_maps_figure(frame_maps, shares, title: str = ''):
  """frame_maps [L, nt, nt] (row i: where frame i's queries attend), shares
  [L, 3]: one heatmap per STA block, its CA / SA / LA shares in the title."""
  frame_maps, shares = np.asarray(frame_maps), np.asarray(shares)
  blocks, nt = len(frame_maps), frame_maps.shape[-1]
  fig, axes = plt.subplots(1, blocks, figsize=(2.3 * blocks + 0.8, 2.8),
                           dpi=80, squeeze=False)
  for index, (ax, block, share) in enumerate(zip(axes[0], frame_maps, shares)):
    shown = ax.imshow(block, cmap='magma', vmin=0, vmax=1)
    ax.set_title(f'block {index + 1}\n' + ' '.join(
        f'{n} {v:.2f}' for n, v in zip(SHARE_NAMES, share)), fontsize=8)
    ax.set_xticks(range(nt), range(nt), fontsize=6)
    ax.set_yticks(range(nt), range(nt), fontsize=6)
    ax.set_xlabel('key frame j', fontsize=7)
  axes[0, 0].set_ylabel('query frame i', fontsize=7)
  fig.colorbar(shown, ax=axes[0].tolist(), fraction=0.02, label='mass')
  fig.suptitle(title or 'frame-to-frame attention per STA block', fontsize=9)
  return fig


def shares_figure(shares):
  """shares [L, 3]: the CA / SA / LA share of the attention mass per block."""
  shares = np.asarray(shares)
  depth = np.arange(1, len(shares) + 1)
  fig, ax = plt.subplots(figsize=(4.5, 3), dpi=80)
  for column, name in enumerate(SHARE_NAMES):
    ax.plot(depth, shares[:, column], marker='o', label=name)
  ax.set_xticks(depth)
  ax.set_ylim(0, 1)
  ax.set_xlabel('STA block')
  ax.set_ylabel('share of attention mass')
  ax.set_title('where the queries attend, by depth')
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def timeline_figure(frames, weights, titles=None):
  """frames uint8 [nt, H, W, 3] (one per token frame), weights [nt]: the
  video class token's attention on each frame, as bars under the frames;
  `titles` above them (default 'frame i')."""
  weights = np.asarray(weights)
  nt = len(weights)
  titles = titles or [f'frame {i}' for i in range(nt)]
  fig, axes = plt.subplots(2, nt, figsize=(1.2 * nt + 0.6, 2.8), dpi=80,
                           gridspec_kw={'height_ratios': [1, 1]},
                           squeeze=False)
  for ax, frame, title in zip(axes[0], frames, titles):
    ax.imshow(frame)
    ax.set_axis_off()
    ax.set_title(title, fontsize=7)
  bars = fig.add_subplot(2, 1, 2)
  for ax in axes[1]:
    ax.set_axis_off()
  bars.bar(range(nt), weights, color='tab:orange')
  bars.set_xlim(-0.5, nt - 0.5)
  bars.set_xticks(range(nt))
  bars.set_ylabel('attention', fontsize=8)
  bars.set_title('temporal aggregation: video class token -> frame',
                 fontsize=8)
  fig.tight_layout()
  return fig


def cls_overlay_figure(frames, grids, titles, block: int):
  """frames uint8 [k, H, W, 3], grids [k, kh, kw]: the class token's CA
  weights of STA block `block`, upsampled over each frame (k titles)."""
  count = len(frames)
  fig, axes = plt.subplots(1, count, figsize=(1.8 * count, 2.1), dpi=80,
                           squeeze=False)
  for ax, frame, grid, title in zip(axes[0], frames, grids, titles):
    height, width = frame.shape[:2]
    ax.imshow(frame)
    ax.imshow(grid, cmap='jet', alpha=0.45, interpolation='bilinear',
              extent=(0, width, height, 0))
    ax.set_axis_off()
    ax.set_title(title, fontsize=7)
  fig.suptitle(f'class token CA attention, block {block}', fontsize=8)
  fig.tight_layout()
  return fig


def long_video_figure(windows: list[dict], num_classes: int = 5):
  """windows: [{'start_s', 'end_s', 'probabilities': {name: p}}]: the
  probability over time of the classes that are most often top-1 / best."""
  centres = np.array([(w['start_s'] + w['end_s']) / 2 for w in windows])
  names = list(windows[0]['probabilities'])
  probs = np.array([[w['probabilities'][n] for n in names] for w in windows])
  best = np.argsort(-probs.max(axis=0), kind='stable')[:num_classes]
  fig, ax = plt.subplots(figsize=(7, 3), dpi=80)
  for c in best:
    ax.plot(centres, probs[:, c], marker='.', label=names[c])
  ax.set_ylim(0, 1)
  ax.set_xlabel('time (s, window centre)')
  ax.set_ylabel('probability')
  ax.legend(fontsize=7, loc='upper right')
  ax.set_title('top classes over time')
  fig.tight_layout()
  return fig
