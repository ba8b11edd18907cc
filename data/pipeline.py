"""tf.data train and eval pipelines over DMVR shards (docs/design.md#data).

Phases: index -> order -> read -> parse -> sample -> decode -> crop -> batch.
Batches are uint8 clips; the train augmentation after the crop (flip,
RandAugment, normalisation, random erasing) runs on the device
(stat_jax/augment_device.py), from per-clip key data shipped with them.

Index: data/records.py. Labels: data/labels.py. Train order: epoch e permutes the global index with
tf.random.experimental.index_shuffle seeded (seed, e); process k of P takes
positions k, k + P, ... of it (a strided slice of the record index, so any
number of shards works for any number of processes), n // P records per
process per epoch (batches run on across epoch ends). Records are read with FixedLengthRecordDataset under a deterministic
parallel interleave. The iterator state is (epoch, position), a few ints:
resuming skips index entries, never data. Per-record randomness comes from
the stateless seed fold_in(fold_in((seed, 0), epoch), global position): the
frames, the crop windows and the uint32 [2] key data of each clip's device
augmentation. With data.repeated_augment = k each record gives k clips of
the same frames, each with its own crop and key (batch_size counts clips).

A record that fails to parse, lacks a label, or has a JPEG that fails to
decode is dropped and counted in `num_skipped` (and by reason, SKIP_REASONS),
never turned into a zero clip. Train: every index entry yields exactly one
stream element, the clip or a marker with the reason it was skipped, so the
Python side sees every record: data.max_consecutive_skips records in a row
without a clip (or a whole epoch of them) stop the run naming the shards,
and a stop request (SIGTERM) is honoured between chunks of records instead
of waiting forever inside tf.data. Frames are checked for the JPEG start
and end markers before libjpeg sees them (libjpeg prints a line to stderr
for every bad frame).

Eval: process k reads the contiguous slice [k n / P, (k+1) n / P) of the
index sorted by (file, offset); each video yields num_clips x num_crops views.
One batch element is one view; every process yields the same number of
batches, eval_batch_size * views / P elements each, padded at the end with
mask False (label and video_id -1).
"""

import collections
import math
import os

import numpy as np
import tensorflow as tf

from data import dmvr
from data import labels
from data import records
from data import sampling
from stat_jax import defaults
from stat_jax.errors import UserError

# The config key that lets a run resume on train data other than its
# checkpoint's (TrainIterator.set_state).
DATA_CHANGE_KEY = 'data.allow_data_change'

_PREFETCH_BATCHES = 2
# Why a train record was skipped: reason code -> what the logs call it.
SKIP_REASONS = {1: 'unreadable or not a clip', 2: 'no label or label out of '
                'range', 3: 'frames that do not decode as JPEG'}
_SKIP_KEYS = {1: 'skipped_unreadable', 2: 'skipped_label', 3: 'skipped_jpeg'}


class Interrupted(Exception):
  """A stop request (SIGTERM) arrived while the train iterator waited for
  valid clips; its state is still that after the last batch it returned."""


def _checked_jpegs(jpegs):
  """`jpegs` once each starts with the JPEG SOI and ends with the EOI marker
  (else InvalidArgumentError): libjpeg prints to stderr for every frame it
  rejects, which floods the log when a whole shard is bad."""
  ok = tf.reduce_all(
      (tf.strings.substr(jpegs, 0, 3) == b'\xff\xd8\xff')
      & (tf.strings.substr(jpegs, -2, 2) == b'\xff\xd9'))
  with tf.control_dependencies([tf.debugging.Assert(ok, ['not a JPEG'])]):
    return tf.identity(jpegs)


# ------------------------------------------------------------------- train ---

def _train_clips(element, data, seed, table, num_classes):
  """The data.repeated_augment clips of one record: video uint8 [k, T, crop,
  crop, 3], key uint32 [k, 2] (each clip's device augmentation), label."""
  count = data.repeated_augment
  record_seed = tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(
          tf.constant([seed, 0], tf.int64), element['epoch']),
      element['global_position'])
  time_seed, crop_seed, device_seed = tf.unstack(
      tf.random.experimental.stateless_split(record_seed, 3))
  parsed = dmvr.parse_tf(element['record'])
  label = labels.label(parsed, table, num_classes)
  indices = sampling.train_indices(tf.size(parsed['frames']), data, time_seed)
  jpegs = _checked_jpegs(tf.gather(parsed['frames'], indices))  # [T]
  video = sampling.random_resized_crops(jpegs, data, crop_seed, count)
  key = tf.random.stateless_uniform([count, 2], device_seed, minval=None,
                                    maxval=None, dtype=tf.uint32)
  return {'video': video, 'key': key, 'label': label,
          'epoch': element['epoch'], 'position': element['position'],
          'file': element['file'], 'reason': tf.constant(0, tf.int32)}


def _skipped(element, data, reason):
  """The stream element of a skipped record: a zero video, never yielded."""
  count = data.repeated_augment
  return {'video': tf.zeros([count, *defaults.clip_shape(data)], tf.uint8),
          'key': tf.zeros([count, 2], tf.uint32),
          'label': tf.constant(-1, tf.int32), 'epoch': element['epoch'],
          'position': element['position'], 'file': element['file'],
          'reason': tf.constant(reason, tf.int32)}


def _train_element(entry, read_one, data, seed, table, num_classes):
  """Exactly one element for one index entry, never an error: the clip, or
  _skipped with the first reason of SKIP_REASONS that explains the failure
  (the checks after the first attempt run only for bad records)."""
  record = read_one(entry)

  def parses(element):
    dmvr.parse_tf(element['record'])
    return _skipped(element, data, 2)

  def labelled(element):
    labels.label(dmvr.parse_tf(element['record']), table, num_classes)
    return _skipped(element, data, 3)

  attempts = [
      record.map(lambda e: _train_clips(e, data, seed, table, num_classes)),
      record.map(labelled), record.map(parses)]
  elements = tf.data.Dataset.from_tensors(_skipped(entry, data, 1))
  for attempt in reversed(attempts):
    elements = attempt.ignore_errors().concatenate(elements)
  return elements.take(1)


class TrainIterator:
  """Infinite iterator of {'video' uint8 [b, T, crop, crop, 3], 'key'
  uint32 [b, 2] (augment_device's key data), 'label' int32 [b]} numpy
  batches, b = batch_size // process_count clips from b / k records (k =
  data.repeated_augment, a record's clips side by side); exact resume via
  get_state() / set_state()."""

  def __init__(self, config, process_index, process_count):
    clips_per_record = config.data.repeated_augment
    if config.batch_size % (process_count * clips_per_record):
      raise UserError(f'batch_size {config.batch_size} is not divisible by '
                       f'process_count {process_count} x '
                       f'data.repeated_augment {clips_per_record}')
    self._data = config.data
    self._num_classes = config.model.num_classes
    self._records_per_batch = (config.batch_size // process_count
                               // clips_per_record)
    self._process = (process_index, process_count)
    self._index = records.RecordIndex(self._data.train_spec)
    self.records_per_epoch = len(self._index) // process_count
    if not self.records_per_epoch:
      raise UserError(f'{self._data.train_spec}: {len(self._index)} records '
                       f'for {process_count} processes')
    self._seed = int(config.seed)
    self._table = labels.label_table(self._data, self._data.train_spec)
    self._epoch, self._position, self.num_skipped = 0, 0, 0
    self.skipped = dict.fromkeys(SKIP_REASONS, 0)  # reason -> records
    self._report_mark = (0, 0)  # (stream position, skipped) at skip_report
    self._batches, self._chunk, self._offset = None, None, 0
    self._max_run = int(self._data.max_consecutive_skips)
    self._data_ids = {
        'num_records': len(self._index), 'num_shards': len(self._index.files),
        'data_fingerprint': self._index.fingerprint()}
    # Set by the trainer: called while waiting for valid clips; True raises
    # Interrupted (a SIGTERM must stop a run whose data is all bad).
    self.should_stop = None

  def _entries(self):
    """Index entries from the saved (epoch, position) on, forever."""
    process_index, process_count = self._process
    per_epoch, total = self.records_per_epoch, len(self._index)
    columns = {k: tf.constant(v) for k, v in self._index.entries(
        np.arange(total)).items()}

    def entry(stream):  # stream = epoch * records_per_epoch + position
      epoch, position = stream // per_epoch, stream % per_epoch
      global_position = position * process_count + process_index
      record = tf.random.experimental.index_shuffle(
          global_position, seed=tf.stack([tf.constant(self._seed, tf.int64),
                                          epoch]),
          max_index=tf.constant(total - 1, tf.int64))
      entries = {k: tf.gather(v, record) for k, v in columns.items()}
      return dict(entries, epoch=epoch, position=position,
                  global_position=global_position)

    start = self._epoch * per_epoch + self._position
    return tf.data.Dataset.counter(start).map(entry)

  def _dataset(self):
    """Chunks of `batch` stream elements, clips and skipped markers."""
    read_one = records.record_reader(self._index)
    parallel = self._data.num_parallel_calls
    elements = self._entries().interleave(
        lambda e: _train_element(e, read_one, self._data, self._seed,
                                 self._table, self._num_classes),
        cycle_length=parallel if parallel > 0 else max(records.READ_PARALLELISM,
                                                       os.cpu_count() or 1),
        num_parallel_calls=parallel, deterministic=True)
    return (elements.batch(self._records_per_batch, drop_remainder=True)
            .prefetch(_PREFETCH_BATCHES))

  def __iter__(self):
    return self

  @property
  def stream_position(self) -> int:
    """Records consumed since epoch 0 (clips yielded plus skipped)."""
    return self._epoch * self.records_per_epoch + self._position

  def _next_chunk(self):
    if self.should_stop is not None and self.should_stop():
      raise Interrupted(f'stopped while reading {self._data.train_spec}')
    if self._batches is None:
      self._batches = self._dataset().as_numpy_iterator()
    return next(self._batches)

  def __next__(self) -> dict:
    """The clips of the next `batch` records; skipped records are counted on
    the way. The state changes only when a batch is returned."""
    chunk, offset, parts = self._chunk, self._offset, []
    need = self._records_per_batch
    skipped, run, run_files = collections.Counter(), 0, collections.Counter()
    per_epoch, run_start = self.records_per_epoch, 0
    try:
      while need:
        if chunk is None or offset == len(chunk['reason']):
          chunk, offset = self._next_chunk(), 0
        reasons = chunk['reason'][offset:]
        good = np.flatnonzero(reasons == 0)[:need]
        end = good[-1] + 1 if len(good) == need else len(reasons)
        for row in range(end):  # consecutive skips, by reason and shard
          if reasons[row]:
            stream = (int(chunk['epoch'][offset + row]) * per_epoch
                      + int(chunk['position'][offset + row]))
            run_start = stream if not run else run_start
            skipped[int(reasons[row])] += 1
            run += 1
            run_files[int(chunk['file'][offset + row])] += 1
            # The run holds a whole epoch: no record of this process gives
            # a clip.
            epoch_start = -(-run_start // per_epoch) * per_epoch
            whole_epoch = stream >= epoch_start + per_epoch - 1
            if run >= self._max_run or whole_epoch:
              raise self._too_many_skips(run, run_files, skipped, whole_epoch)
          else:
            run, run_files = 0, collections.Counter()
        parts.append({key: chunk[key][offset + good] for key in
                      ('video', 'key', 'label', 'epoch', 'position')})
        offset += end
        need -= len(good)
    except BaseException:
      self._batches, self._chunk = None, None  # restart at the saved state
      raise
    self._chunk, self._offset = chunk, offset
    batch = parts[0] if len(parts) == 1 else {
        key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    last = int(batch['epoch'][-1]) * self.records_per_epoch + int(
        batch['position'][-1])
    self._epoch, self._position = divmod(last + 1, self.records_per_epoch)
    for reason, count in skipped.items():
      self.skipped[reason] += count
    self.num_skipped += sum(skipped.values())
    return _clips(batch, self._data.repeated_augment)

  def _too_many_skips(self, run, run_files, skipped, whole_epoch) -> UserError:
    files = ', '.join(f'{self._index.files[f]} ({n})'
                      for f, n in run_files.most_common(5))
    more = len(run_files) - 5
    reasons = ', '.join(f'{SKIP_REASONS[r]}: {n}'
                        for r, n in skipped.most_common())
    limit = (f'all {self.records_per_epoch} records of an epoch among them'
             if whole_epoch else f'data.max_consecutive_skips = '
             f'{self._data.max_consecutive_skips}')
    return UserError(
        f'train data: {run} records in a row gave no clip ({limit}); '
        f'{reasons}; from {files}{f" and {more} more shards" if more > 0 else ""}'
        f'. Check them with python -m data.inspect')

  @property
  def index(self) -> records.RecordIndex:
    return self._index

  def skip_report(self) -> tuple[str, str | None]:
    """(' | skipped N (reason: n, ...)' for the progress line, '' when none;
    a warning line when more than data.skip_warning_fraction of the records
    read since the previous call were skipped, else None)."""
    read = self.stream_position - self._report_mark[0]
    skipped = self.num_skipped - self._report_mark[1]
    self._report_mark = (self.stream_position, self.num_skipped)
    summary = self.skipped_summary()
    warning = None
    if read and skipped / read > self._data.skip_warning_fraction:
      warning = (f'warning: {skipped} of the {read} train records read since '
                 f'the previous report were skipped ({skipped / read:.0%} > '
                 f'data.skip_warning_fraction = '
                 f'{self._data.skip_warning_fraction}); check '
                 f'{self._data.train_spec} with python -m data.inspect')
    return (f' | skipped {summary}' if summary else ''), warning

  def skipped_summary(self) -> str:
    """'N (reason: n, ...)' of the records skipped so far, or ''."""
    if not self.num_skipped:
      return ''
    return f'{self.num_skipped} (' + ', '.join(
        f'{SKIP_REASONS[r]}: {n}' for r, n in self.skipped.items() if n) + ')'

  def get_state(self) -> dict:
    """Small ints: where the next batch starts, plus what must match."""
    process_index, process_count = self._process
    return {'epoch': self._epoch, 'position': self._position,
            'num_skipped': self.num_skipped, 'seed': self._seed,
            'process_index': process_index, 'process_count': process_count,
            **self._data_ids,
            **{_SKIP_KEYS[r]: n for r, n in self.skipped.items()}}

  def set_state(self, state: dict, *, allow_data_change: bool = False):
    """Resume at `state`. A state of other train data (shards added or
    removed: other record count or index fingerprint) is refused unless
    `allow_data_change` (then the position is kept where it fits)."""
    expected = self.get_state()
    for key in ('seed', 'process_index', 'process_count'):
      if int(state[key]) != expected[key]:
        raise UserError(f'iterator state {key}: expected {expected[key]}, '
                         f'got {state[key]}')
    changed = [key for key in self._data_ids
               if key in state and int(state[key]) != expected[key]]
    if changed and not allow_data_change:
      raise UserError(
          f'data.train_spec {self._data.train_spec!r} now gives '
          f'{expected["num_records"]} records in {expected["num_shards"]} '
          f'shard(s); the checkpoint was written reading '
          f'{state.get("num_records")} records in {state.get("num_shards")} '
          f'shard(s) (differs: {", ".join(changed)}). Restore the shards, or set '
          f'{DATA_CHANGE_KEY}=True to resume on the new data on purpose')
    if changed and int(state['position']) >= self.records_per_epoch:
      state = dict(state, position=0, epoch=int(state['epoch']) + 1)
    if not 0 <= int(state['position']) < self.records_per_epoch:
      raise UserError(f'iterator state position: expected 0..'
                       f'{self.records_per_epoch - 1}, got {state["position"]}')
    self._epoch, self._position = int(state['epoch']), int(state['position'])
    self.num_skipped = int(state['num_skipped'])
    self.skipped = {r: int(state.get(key, 0)) for r, key in _SKIP_KEYS.items()}
    self._report_mark = (self.stream_position, self.num_skipped)
    self._batches, self._chunk, self._offset = None, None, 0


def _clips(per_record: dict, count: int) -> dict:
  """Records' video [n, k, ...], key [n, k, 2], label [n] -> the batch of
  their n k clips, a record's clips side by side."""
  video = per_record['video']
  return {'video': video.reshape(-1, *video.shape[2:]),
          'key': per_record['key'].reshape(-1, 2),
          'label': np.repeat(per_record['label'], count)}


def make_train_iterator(config, *, process_index=0,
                        process_count=1) -> TrainIterator:
  """Train batches for this process (see TrainIterator)."""
  return TrainIterator(config, process_index, process_count)


# -------------------------------------------------------------------- eval ---

def eval_views(parsed, data):
  """uint8 [V, T, crop, crop, 3], V = clips x crops: the eval views of one
  record parsed by dmvr.parse_tf (explain reads records through it too)."""
  clip_frames = data.num_clips * data.num_frames
  indices = sampling.eval_indices(tf.size(parsed['frames']), data)  # [C, T]
  jpegs = _checked_jpegs(
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
  doc. The model normalises them on the device (make_eval_step)."""

  def __init__(self, config, process_index, process_count):
    data = self._data = config.data
    if data.eval_short_side < data.crop_size:
      raise UserError(f'data.eval_short_side {data.eval_short_side} < '
                       f'data.crop_size {data.crop_size}')
    self.num_views = data.num_clips * data.num_crops
    global_views = data.eval_batch_size * self.num_views
    if global_views % process_count:
      raise UserError(f'eval_batch_size * views = {global_views} is not '
                       f'divisible by process_count {process_count}')
    self._batch = global_views // process_count
    self._index = records.RecordIndex(data.eval_spec)
    total = len(self._index)
    self._first = process_index * total // process_count
    self._stop = (process_index + 1) * total // process_count
    self.num_batches = math.ceil(
        math.ceil(total / process_count) * self.num_views / self._batch)
    self._table = labels.label_table(data, data.eval_spec)
    self._num_classes = config.model.num_classes
    self._seen, self._done = set(), False
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
    views = records.read(tf.data.Dataset.from_tensor_slices(entries),
                         self._index).map(
        lambda e: _eval_views(e, self._data, self._table, self._num_classes),
        num_parallel_calls=self._data.num_parallel_calls, deterministic=True)
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
      raise
    self._seen.update(batch['video_id'][batch['mask']].tolist())
    return batch


def make_eval_iterator(config, *, process_index=0,
                       process_count=1) -> EvalIterator:
  """Every eval video of this process once, as padded view batches."""
  return EvalIterator(config, process_index, process_count)
