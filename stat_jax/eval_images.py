"""TensorBoard images at each evaluation of a training run: the confusion
matrix, and the frame-to-frame attention maps of a few fixed val clips
(config.attention_images; 0: none) with their CA / SA / LA shares.

The clips are the first distinct videos of the eval set's first batch, the
same on every process (each reads them), replicated over the mesh; the
capture program (stat_jax/attention_maps.py) is compiled once, at the first
evaluation.
"""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from stat_jax.data import labels
from stat_jax.data import eval_pipeline
from stat_jax import attention_maps, plots


def fixed_clips(config, count: int) -> np.ndarray:
  """uint8 [<= count, T, H, W, 3] views of distinct videos."""
  batch = next(iter(eval_pipeline.make_eval_iterator(config)))
  rows, seen = [], set()
  for row, (video, real) in enumerate(zip(batch['video_id'], batch['mask'])):
    if real and video not in seen and len(rows) < count:
      seen.add(video)
      rows.append(row)
  return np.asarray(batch['video'])[rows]


class EvalImages:
  """write(writer, step, params, result): the images of one evaluation."""

  def __init__(self, config, parts, mesh):
    self.class_names = labels.class_names(config)
    self.clips = None
    if config.attention_images and config.data.eval_spec:
      replicated = NamedSharding(mesh, PartitionSpec())
      self.clips = jax.make_array_from_process_local_data(
          replicated, fixed_clips(config, config.attention_images))
      self.capture = jax.jit(attention_maps.capture_fn(parts, config.data),
                             out_shardings=replicated)

  def write(self, writer, step: int, params, result: dict) -> None:
    """A collective with attention images: every process calls it."""
    images = {'val_confusion_matrix': plots.to_image(plots.confusion_figure(
        result['confusion_matrix'], self.class_names))}
    if self.clips is not None:
      _, summary = self.capture(params, self.clips)
      maps, shares = np.asarray(summary['frame_maps']), np.asarray(
          summary['shares'])  # [L, n, nt, nt], [L, n, 3]
      for clip in range(maps.shape[1]):
        images[f'attention/clip{clip}'] = plots.to_image(
            plots.frame_maps_figure(maps[:, clip], shares[:, clip],
                                    f'val clip {clip}: frame-to-frame attention'))
    if jax.process_index() == 0:
      writer.write_images(step, {k: v[None] for k, v in images.items()})
