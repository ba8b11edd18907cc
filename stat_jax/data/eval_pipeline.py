"""tf.data eval pipeline over DMVR shards: every eval video once, as batches
of uint8 views (docs/design.md#data).

Process k reads the contiguous slice [k n / P, (k+1) n / P) of the record
index sorted by (file, offset) (stat_jax/data/records.py); each video yields
num_clips x num_crops views (stat_jax/data/sampling.py eval_indices, spatial_crops).
One batch element is one view; every process yields the same number of
batches of the same size: its share of eval_batch_size * views (rounded
up) rounded up to a multiple of its devices, so that the global batch
splits over every device of any mesh. Rows past the last view are padding
with mask False (label and video_id -1), counted nowhere. A record that
does not give its views is skipped and counted (num_skipped) if its own
data is bad: it is decoded again on its own with errors raised, and any
error other than a data error (train_pipeline.DATA_ERRORS) stops the
evaluation. The model normalises the views on the device
(train_step.make_eval_step).
"""

import math

import numpy as np
import tensorflow as tf

from stat_jax.data import dmvr
from stat_jax.data import labels
from stat_jax.data import records
from stat_jax.data import sampling
from stat_jax.data.train_pipeline import DATA_ERRORS
from stat_jax import defaults
from stat_jax.checks.errors import UserError

_PREFETCH_BATCHES = 2


def eval_views(parsed, data):
  """uint8 [V, T, crop, crop, 3], V = clips x crops: the eval views of one
  record parsed by dmvr.parse_tf (explain reads records through it too)."""
  clip_frames = data.num_clips * data.num_frames
  indices = sampling.eval_indices(tf.size(parsed['frames']), data)  # [C, T]
  jpegs = sampling.checked_jpegs(
      tf.gather(parsed['frames'], tf.reshape(indices, [-1])))  # [C*T]
  frames = sampling.resize_short_side(
      sampling.decode_frames(jpegs, clip_frames), data.eval_short_side)
  clips = tf.reshape(frames, tf.concat(
      [[data.num_clips, data.num_frames], tf.shape(frames)[1:]], 0))
  views = sampling.spatial_crops(clips, data.crop_size, data.num_crops)
  return tf.ensure_shape(tf.cast(tf.round(views), tf.uint8), [
      data.num_clips * data.num_crops, data.num_frames, data.crop_size,
      data.crop_size, 3])


def _eval_views(element, data, table, num_classes):
  """All views of one video: video uint8 [V, T, crop, crop, 3], V = clips x
  crops, with label, video_id, view, mask [V]."""
  parsed = dmvr.parse_tf(element['record'])
  label = labels.label(parsed, table, num_classes)
  views = eval_views(parsed, data)
  num_views = data.num_clips * data.num_crops
  return {'video': views, 'label': tf.fill([num_views], label),
          'video_id': tf.fill([num_views], tf.cast(element['video_id'],
                                                   tf.int32)),
          'view': tf.range(num_views, dtype=tf.int32),
          'mask': tf.ones([num_views], tf.bool)}


class EvalIterator:
  """Finite iterator of view batches {'video' uint8 [b, T, crop, crop, 3],
  'label', 'video_id', 'view' int32 [b], 'mask' bool [b]}; see the module
  doc."""

  def __init__(self, config, process_index, process_count,
               devices_per_process=1):
    data = self._data = config.data
    if data.eval_short_side < data.crop_size:
      raise UserError(f'data.eval_short_side {data.eval_short_side} < '
                       f'data.crop_size {data.crop_size}')
    self.num_views = data.num_clips * data.num_crops
    share = math.ceil(data.eval_batch_size * self.num_views / process_count)
    self._batch = math.ceil(share / devices_per_process) * devices_per_process
    self._index = records.RecordIndex(data.eval_spec)
    total = len(self._index)
    self._first = process_index * total // process_count
    self._stop = (process_index + 1) * total // process_count
    self.num_batches = math.ceil(
        math.ceil(total / process_count) * self.num_views / self._batch)
    self._table = labels.label_table(data, data.eval_spec)
    self._num_classes = config.model.num_classes
    self._seen, self._done = set(), False
    self._checked = self._first  # videos before it: yielded or data errors
    table, num_classes = self._table, self._num_classes  # not self: no cycle
    self._strict = tf.function(lambda record, video_id: _eval_views(
        {'record': record, 'video_id': video_id}, data, table, num_classes))
    self._batches = iter(self._dataset().as_numpy_iterator())

  @property
  def num_skipped(self) -> int:
    """Videos of this process not yielded (exact once the iterator is done)."""
    if self._done:
      reached = self._stop
    else:
      reached = max(self._seen) + 1 if self._seen else self._first
    return reached - self._first - len(self._seen)

  def _padding(self):
    data = self._data
    return {'video': tf.zeros(defaults.clip_shape(data), tf.uint8),
            'label': tf.constant(-1), 'video_id': tf.constant(-1),
            'view': tf.constant(-1), 'mask': tf.constant(False)}

  def _dataset(self):
    video_ids = np.arange(self._first, self._stop)  # = record numbers
    entries = dict(self._index.entries(video_ids), video_id=video_ids)
    # A function over locals, not self: a dropped iterator is freed at once,
    # its tf.data threads with it (not by a stalling garbage collection).
    data, table, num_classes = self._data, self._table, self._num_classes
    views = records.read(tf.data.Dataset.from_tensor_slices(entries),
                         self._index).map(
        lambda e: _eval_views(e, data, table, num_classes),
        num_parallel_calls=data.num_parallel_calls, deterministic=True)
    padded = views.ignore_errors().unbatch().concatenate(
        tf.data.Dataset.from_tensors(self._padding()).repeat())
    return (padded.take(self.num_batches * self._batch).batch(self._batch)
            .prefetch(_PREFETCH_BATCHES))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      batch = next(self._batches)
    except StopIteration:
      self._done = True
      self._check_skipped(self._stop)
      raise
    self._seen.update(batch['video_id'][batch['mask']].tolist())
    self._check_skipped(max(self._seen, default=self._first))
    return batch

  def _check_skipped(self, upto: int) -> None:
    """The videos before `upto` not yielded, decoded again with errors
    raised: a data error is why they were skipped; any other error, or a
    decode that now succeeds, is a RuntimeError (from the error)."""
    for video_id in range(self._checked, upto):
      if video_id in self._seen:
        continue
      try:
        self._strict(tf.constant(self._index.read(video_id)),
                     tf.constant(video_id, tf.int64))
      except DATA_ERRORS:
        continue
      except Exception as error:
        raise RuntimeError(f'eval record {video_id}: its decode failed with '
                           f'{type(error).__name__}, not a data error; '
                           'stopping') from error
      raise RuntimeError(
          f'eval record {video_id} gave no views in the pipeline but decodes '
          'on its own: the pipeline failed for a reason other than its data')
    self._checked = max(self._checked, upto)


def make_eval_iterator(config, *, process_index=0, process_count=1,
                       devices_per_process=1) -> EvalIterator:
  """Every eval video of this process once, as padded view batches."""
  return EvalIterator(config, process_index, process_count,
                      devices_per_process)
