"""tf.data train and eval pipelines over DMVR shards (docs/design.md#data).

Phases: index -> order -> read -> parse -> sample -> decode -> augment -> batch.

Index: every shard is indexed once by a header scan into (file, offset,
length) triples. Train order: epoch e permutes the global index with
tf.random.experimental.index_shuffle seeded (seed, e); process k of P takes
positions k, k + P, ... of it (a strided slice of the record index, so any
number of shards works for any number of processes), n // P records per
process per epoch (batches run on across epoch ends). Records are read with FixedLengthRecordDataset under a deterministic
parallel interleave. The iterator state is (epoch, position), a few ints:
resuming skips index entries, never data. Per-clip randomness comes from the
stateless seed fold_in(fold_in((seed, 0), epoch), global position).

A record that fails to parse, lacks a label, or has a JPEG that fails to
decode is dropped and counted in `num_skipped` (from the gaps it leaves in
the positions), never turned into a zero clip.

Eval: process k reads the contiguous slice [k n / P, (k+1) n / P) of the
index sorted by (file, offset); each video yields num_clips x num_crops views.
One batch element is one view; every process yields the same number of
batches, eval_batch_size * views / P elements each, padded at the end with
mask False (label and video_id -1).
"""

import concurrent.futures
import math
import os

import numpy as np
import tensorflow as tf

from data import augment
from data import dmvr
from data import sampling
from stat_jax.errors import UserError

_READ_PARALLELISM = 8  # records read concurrently by the interleave
_PREFETCH_BATCHES = 2


# -------------------------------------------------------------------- index ---

class RecordIndex:
  """All records of a shard spec: files, file sizes, and per record the file
  number, data offset and data length (int64 [n] each), in file order."""

  def __init__(self, spec: str):
    self.files = dmvr.resolve_spec(spec)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      tables = list(pool.map(dmvr.index_shard, self.files))
    self.sizes = np.array([tf.io.gfile.stat(f).length for f in self.files],
                          np.int64)
    self.file = np.concatenate([np.full(len(t), i, np.int64)
                                for i, t in enumerate(tables)])
    rows = np.concatenate(tables)  # [n, 2]
    self.offset, self.length = rows[:, 0], rows[:, 1]
    if not len(self.file):
      raise UserError(f'shard spec {spec!r}: no records in {self.files}')

  def __len__(self):
    return len(self.file)

  def entries(self, records: np.ndarray) -> dict:
    """The read arguments of the given record numbers."""
    return {'file': self.file[records], 'offset': self.offset[records],
            'length': self.length[records]}


def _read(entries: tf.data.Dataset, index: RecordIndex) -> tf.data.Dataset:
  """Adds 'record' (bytes) to each element holding file/offset/length."""
  files = tf.constant(index.files)
  sizes = tf.constant(index.sizes)

  def read_one(entry):
    footer = tf.gather(sizes, entry['file']) - entry['offset'] - entry['length']
    records = tf.data.FixedLengthRecordDataset(
        tf.gather(files, entry['file']), record_bytes=entry['length'],
        header_bytes=entry['offset'], footer_bytes=footer)
    return records.map(lambda record: dict(entry, record=record))

  return entries.interleave(read_one, cycle_length=_READ_PARALLELISM,
                            num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)


# ------------------------------------------------------------------ labels ---

def _label_table(data, spec):
  """class name -> label from data.label_map (or label_map.txt beside the
  shards); None when there is no such file (then records need an index)."""
  path = data.label_map or os.path.join(dmvr.spec_directory(spec),
                                        'label_map.txt')
  if not tf.io.gfile.exists(path):
    if data.label_map:
      raise FileNotFoundError(f'data.label_map: no such file {path}')
    return None
  names = dmvr.load_label_map(path)
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(names, tf.range(len(names))), -1)


def _label_map_paths(data):
  if data.label_map:
    yield data.label_map
  for spec in (data.eval_spec, data.train_spec):
    if spec:
      try:
        yield os.path.join(dmvr.spec_directory(spec), 'label_map.txt')
      except (FileNotFoundError, ValueError):  # shards moved or deleted
        continue


def class_names(config) -> list[str]:
  """From data.label_map, else label_map.txt beside the eval (or train)
  shards, else '0' .. 'N-1'."""
  count = config.model.num_classes
  for path in _label_map_paths(config.data):
    if os.path.exists(path):
      names = dmvr.load_label_map(path)
      if len(names) != count:
        raise UserError(f'{path}: {len(names)} class names, but '
                         f'model.num_classes = {count}')
      return names
  return [str(i) for i in range(count)]


def _label(parsed, table, num_classes):
  """int32 label: the first clip/label/index, else the label map entry of the
  first text label; a record with neither (or out of range) fails."""
  candidates = [tf.cast(parsed['label_index'], tf.int32)]
  if table is not None:
    candidates.append(table.lookup(parsed['label_text']))
  label = tf.concat(candidates + [[-1]], 0)[0]
  checks = [tf.debugging.assert_non_negative(label, message='no label'),
            tf.debugging.assert_less(label, num_classes,
                                     message='label >= num_classes')]
  with tf.control_dependencies(checks):
    return tf.identity(label)


def normalisation(data) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset), float32 [3]: (x / 255 - mean) / std = x * scale +
  offset per channel, for x in [0, 255]. The model's input; exports apply
  it inside the model (stat_jax/deploy/inference.py)."""
  std = np.asarray(data.std, np.float64)
  scale = 1 / (255 * std)
  offset = -np.asarray(data.mean, np.float64) / std
  return scale.astype(np.float32), offset.astype(np.float32)


def _normalise(video, data):
  """normalisation() of a [0, 255] video (scalars when all channels agree:
  broadcasting a [3] vector is ~4x slower on CPU)."""
  scale, offset = normalisation(data)
  if (scale == scale[0]).all() and (offset == offset[0]).all():
    return video * scale[0] + offset[0]
  return video * scale + offset


# ------------------------------------------------------------------- train ---

def _train_clip(element, data, seed, table, num_classes):
  """One augmented clip: video float32 [T, crop, crop, 3], label int32."""
  key = tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(
          tf.constant([seed, 0], tf.int64), element['epoch']),
      element['global_position'])
  time_key, crop_key, flip_key, rand_key, erase_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 5))
  parsed = dmvr.parse_tf(element['record'])
  label = _label(parsed, table, num_classes)
  indices = sampling.train_indices(tf.size(parsed['frames']), data, time_key)
  jpegs = tf.gather(parsed['frames'], indices)  # [T]
  window = augment.random_crop_window(tf.io.extract_jpeg_shape(jpegs[0]),
                                      crop_key, data.area_range,
                                      data.aspect_range)
  frames = sampling.decode_frames(jpegs, data.num_frames, window)
  video = tf.image.resize(frames, [data.crop_size, data.crop_size])
  if data.flip:
    video = augment.random_flip(video, flip_key)
  if data.randaugment_layers:
    video = augment.rand_augment(video, rand_key, data.randaugment_layers,
                                 data.randaugment_magnitude,
                                 data.randaugment_magnitude_std)
  video = _normalise(video, data)
  if data.random_erasing:
    video = augment.random_erasing(video, erase_key, data.random_erasing)
  return {'video': video, 'label': label, 'epoch': element['epoch'],
          'position': element['position']}


class TrainIterator:
  """Infinite iterator of {'video' float32 [b, T, crop, crop, 3], 'label'
  int32 [b]} numpy batches, b = batch_size // process_count; exact resume via
  get_state() / set_state()."""

  def __init__(self, config, process_index, process_count):
    if config.batch_size % process_count:
      raise UserError(f'batch_size {config.batch_size} is not divisible by '
                       f'process_count {process_count}')
    self._data = config.data
    self._num_classes = config.model.num_classes
    self._batch = config.batch_size // process_count
    self._process = (process_index, process_count)
    self._index = RecordIndex(self._data.train_spec)
    self.records_per_epoch = len(self._index) // process_count
    if not self.records_per_epoch:
      raise UserError(f'{self._data.train_spec}: {len(self._index)} records '
                       f'for {process_count} processes')
    self._seed = int(config.seed)
    self._table = _label_table(self._data, self._data.train_spec)
    self._epoch, self._position, self.num_skipped = 0, 0, 0
    self._batches = None

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
    entries = self._entries()
    clips = _read(entries, self._index).map(
        lambda e: _train_clip(e, self._data, self._seed, self._table,
                              self._num_classes),
        num_parallel_calls=self._data.num_parallel_calls, deterministic=True)
    return (clips.ignore_errors().batch(self._batch, drop_remainder=True)
            .prefetch(_PREFETCH_BATCHES))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._batches is None:
      self._batches = self._dataset().as_numpy_iterator()
    batch = next(self._batches)
    # Stream position of the batch's last clip; gaps are skipped records.
    last = int(batch['epoch'][-1]) * self.records_per_epoch + int(
        batch['position'][-1])
    first = self._epoch * self.records_per_epoch + self._position
    self.num_skipped += last + 1 - first - self._batch
    self._epoch, self._position = divmod(last + 1, self.records_per_epoch)
    return {'video': batch['video'], 'label': batch['label']}

  def get_state(self) -> dict:
    """Small ints: where the next batch starts, plus what must match."""
    process_index, process_count = self._process
    return {'epoch': self._epoch, 'position': self._position,
            'num_skipped': self.num_skipped, 'seed': self._seed,
            'process_index': process_index, 'process_count': process_count}

  def set_state(self, state: dict):
    expected = self.get_state()
    for key in ('seed', 'process_index', 'process_count'):
      if int(state[key]) != expected[key]:
        raise UserError(f'iterator state {key}: expected {expected[key]}, '
                         f'got {state[key]}')
    if not 0 <= int(state['position']) < self.records_per_epoch:
      raise UserError(f'iterator state position: expected 0..'
                       f'{self.records_per_epoch - 1}, got {state["position"]}')
    self._epoch, self._position = int(state['epoch']), int(state['position'])
    self.num_skipped = int(state['num_skipped'])
    self._batches = None


def make_train_iterator(config, *, process_index=0,
                        process_count=1) -> TrainIterator:
  """Train batches for this process (see TrainIterator)."""
  return TrainIterator(config, process_index, process_count)


# -------------------------------------------------------------------- eval ---

def _eval_views(element, data, table, num_classes):
  """All views of one video: video float32 [V, T, crop, crop, 3], V = clips x
  crops, with label, video_id, view, mask [V]."""
  parsed = dmvr.parse_tf(element['record'])
  label = _label(parsed, table, num_classes)
  clip_frames = data.num_clips * data.num_frames
  indices = sampling.eval_indices(tf.size(parsed['frames']), data)  # [C, T]
  jpegs = tf.gather(parsed['frames'], tf.reshape(indices, [-1]))  # [C*T]
  frames = sampling.resize_short_side(
      sampling.decode_frames(jpegs, clip_frames), data.eval_short_side)
  clips = tf.reshape(frames, tf.concat(
      [[data.num_clips, data.num_frames], tf.shape(frames)[1:]], 0))
  views = sampling.spatial_crops(clips, data.crop_size, data.num_crops)
  num_views = data.num_clips * data.num_crops
  views = tf.ensure_shape(_normalise(views, data), [
      num_views, data.num_frames, data.crop_size, data.crop_size, 3])
  return {'video': views, 'label': tf.fill([num_views], label),
          'video_id': tf.fill([num_views], tf.cast(element['video_id'],
                                                   tf.int32)),
          'view': tf.range(num_views, dtype=tf.int32),
          'mask': tf.ones([num_views], tf.bool)}


class EvalIterator:
  """Finite iterator of view batches {'video' [b, T, crop, crop, 3], 'label',
  'video_id', 'view' int32 [b], 'mask' bool [b]}; see the module doc."""

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
    self._index = RecordIndex(data.eval_spec)
    total = len(self._index)
    self._first = process_index * total // process_count
    self._stop = (process_index + 1) * total // process_count
    self.num_batches = math.ceil(
        math.ceil(total / process_count) * self.num_views / self._batch)
    self._table = _label_table(data, data.eval_spec)
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
    return {'video': tf.zeros([data.num_frames, data.crop_size,
                               data.crop_size, 3]),
            'label': tf.constant(-1), 'video_id': tf.constant(-1),
            'view': tf.constant(-1), 'mask': tf.constant(False)}

  def _dataset(self):
    records = np.arange(self._first, self._stop)
    entries = dict(self._index.entries(records), video_id=records)
    views = _read(tf.data.Dataset.from_tensor_slices(entries), self._index).map(
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
