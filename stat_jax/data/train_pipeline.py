"""tf.data train pipeline over DMVR shards (docs/design.md#data); the eval
pipeline is stat_jax/data/eval_pipeline.py.

The file follows the pipeline's phases, in order:
1. index: every record of data.train_spec as a (file, offset, length)
   entry (stat_jax/data/records.py: the shards' index files).
2. order: one global stream of slots, the same for any number of
   processes; slot s holds record perm_e(i) and draws from a seed of its
   own (stat_jax/data/train_order.py). Global batch j is the R = batch_size
   / data.repeated_augment slots [j R, (j + 1) R), a record's clips side by
   side; each process reads the slots of the global batch rows its devices
   hold (sharding.process_rows; by default process k of P the k-th
   contiguous block), so the global batch is the same array whatever the
   process count or mesh, and a run saved by N processes resumes on M with
   the same data.
3. read: each slot's record alone, by its index entry
   (FixedLengthRecordDataset under a deterministic parallel interleave; the
   Python path below, RecordIndex.read).
4. decode: parse, label (stat_jax/data/labels.py), sample the frames and
   decode each one inside its random crop windows (stat_jax/data/sampling.py),
   and draw the uint32 [2] key data of each clip's device augmentation (flip,
   RandAugment, normalisation, random erasing: stat_jax/augment_device.py);
   or, for a record that gives no clip, a marker with the reason.
5. batch: this process's slots of each global batch as one chunk, markers
   filled (below), then the records' clips side by side: uint8 clips.

A record that fails to parse, lacks a label, or has a JPEG that fails to
decode gives no clip. Its slot s takes the next record of the global order
that gives one (slots s + 1, s + 2, ...), with the draws of slot s. The
Python path that finds it takes one slot at a time through the stream's own
order and decode functions (the same record, seed and clips for a slot), so
what a slot holds does not depend on who reads it; such a record then
appears twice in that epoch. The slot is counted in `num_skipped` (by its
own record's reason, SKIP_REASONS), never turned into a zero clip.
data.max_consecutive_skips records in a row without a clip (or as many as
the index holds) stop the run naming the shards, and a stop request
(SIGTERM, single-process) is honoured between records instead of waiting
forever. Frames are checked for the JPEG start and end markers before
libjpeg sees them (libjpeg prints a line to stderr for every bad frame). A
shard that cannot be read any more (deleted during the run) stops the run
naming it. Only data errors are skipped: a record that gives no clip is
decoded again with its errors raised, and unless that fails with a
DATA_ERRORS error (what a bad example, label or JPEG raises), the error (out
of memory, a bug) stops the run with its traceback.

State: the next slot (as epoch, position) and the skip counters of the slots
this process read, a few ints per process. Every process saves its state;
the positions agree, and the counters sum to the run's. Resuming takes the
position (any process count), the counters' sums go to process 0.
"""

import collections
import itertools

import numpy as np
import tensorflow as tf

from stat_jax.data import dmvr
from stat_jax.data import labels
from stat_jax.data import records
from stat_jax.data import sampling
from stat_jax.data import train_order
from stat_jax import defaults
from stat_jax.checks.errors import UserError

# The config key that lets a run resume on train data other than its
# checkpoint's (TrainIterator.set_state).
DATA_CHANGE_KEY = 'data.allow_data_change'
# The train order a data state was saved under. States without the key come
# from the per-process order before it (process k of P read positions k,
# k + P, ... of each epoch), which this one cannot continue.
ORDER_VERSION = 2

_PREFETCH_BATCHES = 2
# Why a train record was skipped: reason code -> what the logs call it.
SKIP_REASONS = {1: 'unreadable or not a clip', 2: 'no label or label out of '
                'range', 3: 'frames that do not decode as JPEG'}
_SKIP_KEYS = {1: 'skipped_unreadable', 2: 'skipped_label', 3: 'skipped_jpeg'}
# What a record's own bad data raises in its decode (tf.io parsing, JPEG
# decoding, the checks of stat_jax/data/sampling.py and stat_jax/data/labels.py).
DATA_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError)
# What every process's saved data state must agree on.
_GLOBAL_KEYS = ('epoch', 'position', 'seed', 'num_records', 'num_shards',
                'data_fingerprint')


class Interrupted(Exception):
  """A stop request (SIGTERM) arrived while the train iterator waited for
  valid clips; its state is still that after the last batch it returned."""


# ------------------------------------------------------------------- index ---

def _index_columns(index: records.RecordIndex) -> dict:
  """Every record's index entry, int64 [n] each: file, offset, length."""
  return {key: tf.constant(value)
          for key, value in index.entries(np.arange(len(index))).items()}


# ------------------------------------------------------------------- order ---

def _batch_slots(rows, clips_per_record: int) -> np.ndarray:
  """The slots (offsets in a global batch) whose clips fill the global batch
  rows `rows` (ascending); UserError if the rows split a record's clips."""
  rows = np.asarray(rows)
  slots = rows[::clips_per_record] // clips_per_record
  whole = (np.repeat(slots * clips_per_record, clips_per_record)
           + np.tile(np.arange(clips_per_record), len(slots)))
  if not np.array_equal(whole, rows):
    raise UserError(
        f'the {len(rows)} global batch rows of this process split the '
        f'{clips_per_record} clips of a record (data.repeated_augment): give '
        f'a batch_size whose share per device is a multiple of '
        f'{clips_per_record}')
  return slots


def _process_slots(first: int, batch_slots: np.ndarray,
                   slots_per_batch: int) -> tf.data.Dataset:
  """The slots this process reads, from global batch slot `first` on: the
  offsets `batch_slots` in each global batch of `slots_per_batch` slots."""
  offsets = tf.constant(batch_slots, tf.int64)
  per_batch = len(batch_slots)
  return tf.data.Dataset.counter().map(
      lambda read: first + read // per_batch * slots_per_batch
      + tf.gather(offsets, read % per_batch))


def _slot_entry(order: train_order.TrainOrder, columns, slot, source):
  """What slot `slot` gets: the index entry (`columns`' file, offset,
  length) and record number of the record that slot `source` holds, and
  the seed of `slot`'s draws. `source` is `slot` in the stream; a later slot
  when the Python path fills a slot whose own record gave no clip."""
  record = order.record(source)
  return dict({key: tf.gather(value, record) for key, value in columns.items()},
              record_number=record, slot=tf.cast(slot, tf.int64),
              seed=order.randomness(slot))


# -------------------------------------------------------------------- read ---

def _read_slot(index: records.RecordIndex, order: train_order.TrainOrder,
               columns, slot: int, source: int) -> dict:
  """The Python path's read of one slot: _slot_entry's entry plus the
  record's bytes ('record'), read alone."""
  entry = _slot_entry(order, columns, slot, source)
  return dict(entry, record=tf.constant(
      index.read(int(entry['record_number']))))


# ------------------------------------------------------------------ decode ---

def _train_clips(element, data, table, num_classes):
  """The data.repeated_augment clips of a read record with the draws of
  its slot (element['seed']): video uint8 [k, T, crop, crop, 3], key uint32
  [k, 2] (each clip's device augmentation), label."""
  count = data.repeated_augment
  time_seed, crop_seed, device_seed = tf.unstack(
      tf.random.experimental.stateless_split(element['seed'], 3))
  parsed = dmvr.parse_tf(element['record'])
  label = labels.label(parsed, table, num_classes)
  indices = sampling.train_indices(tf.size(parsed['frames']), data, time_seed)
  jpegs = sampling.checked_jpegs(tf.gather(parsed['frames'], indices))  # [T]
  video = sampling.random_resized_crops(jpegs, data, crop_seed, count)
  key = tf.random.stateless_uniform([count, 2], device_seed, minval=None,
                                    maxval=None, dtype=tf.uint32)
  return {'video': video, 'key': key, 'label': label, 'slot': element['slot'],
          'file': element['file'], 'reason': tf.constant(0, tf.int32)}


def _skipped(element, data, reason):
  """The element of a record that gives no clip: a zero video, never
  yielded."""
  count = data.repeated_augment
  return {'video': tf.zeros([count, *defaults.clip_shape(data)], tf.uint8),
          'key': tf.zeros([count, 2], tf.uint32),
          'label': tf.constant(-1, tf.int32), 'slot': element['slot'],
          'file': element['file'], 'reason': tf.constant(reason, tf.int32)}


def _train_element(element, data, table, num_classes):
  """The one element of a read record, never an error: the clips, or
  _skipped with the first reason of SKIP_REASONS that explains the failure
  (the checks after the first attempt run only for bad records)."""
  record = tf.data.Dataset.from_tensors(element)

  def parses(element):
    dmvr.parse_tf(element['record'])
    return _skipped(element, data, 2)

  def labelled(element):
    labels.label(dmvr.parse_tf(element['record']), table, num_classes)
    return _skipped(element, data, 3)

  attempts = [
      record.map(lambda e: _train_clips(e, data, table, num_classes)),
      record.map(labelled), record.map(parses)]
  elements = tf.data.Dataset.from_tensors(_skipped(element, data, 1))
  for attempt in reversed(attempts):
    elements = attempt.ignore_errors().concatenate(elements)
  return elements.take(1).get_single_element()


# ------------------------------------------------------------------- batch ---

def _clips(per_record: dict, count: int) -> dict:
  """Records' video [n, k, ...], key [n, k, 2], label [n] -> the batch of
  their n k clips, a record's clips side by side."""
  video = per_record['video']
  return {'video': video.reshape(-1, *video.shape[2:]),
          'key': per_record['key'].reshape(-1, 2),
          'label': np.repeat(per_record['label'], count)}


# ---------------------------------------------------------------- iterator ---

class TrainIterator:
  """Infinite iterator of {'video' uint8 [b, T, crop, crop, 3], 'key'
  uint32 [b, 2] (augment_device's key data), 'label' int32 [b]} numpy
  batches: this process's b rows of each global batch (module doc), from
  b / k records (k = data.repeated_augment, a record's clips side by side).
  `rows`: the global batch rows this process holds (ascending, as
  sharding.process_rows gives them); by default the process_index-th of
  process_count contiguous blocks. Exact resume, on any process count, via
  get_state() / set_state()."""

  def __init__(self, config, process_index, process_count, rows=None):
    clips_per_record = config.data.repeated_augment
    if config.batch_size % (process_count * clips_per_record):
      raise UserError(f'batch_size {config.batch_size} is not divisible by '
                       f'process_count {process_count} x '
                       f'data.repeated_augment {clips_per_record}')
    if rows is None:
      share = config.batch_size // process_count
      rows = np.arange(process_index * share, (process_index + 1) * share)
    self._batch_slots = _batch_slots(rows, clips_per_record)
    self._slots_per_batch = config.batch_size // clips_per_record
    self._process_index = process_index
    self._data = config.data
    self._seed = int(config.seed)
    self._index = records.RecordIndex(self._data.train_spec)
    self._columns = _index_columns(self._index)
    self._order = train_order.TrainOrder(len(self._index), self._seed)
    self._next_slot, self.num_skipped = 0, 0
    self.skipped = dict.fromkeys(SKIP_REASONS, 0)  # reason -> slots
    self._report_mark = (0, 0)  # (next slot, skipped) at skip_report
    self._batches = None
    # No function given to tf.data refers to self: a dropped iterator is
    # freed at once, and its tf.data threads with it, instead of waiting for
    # a garbage collection to break a reference cycle (and stall it while
    # the threads stop).
    data, table = self._data, labels.label_table(self._data,
                                                 self._data.train_spec)
    num_classes = config.model.num_classes
    self._element = lambda element: _train_element(element, data, table,
                                                   num_classes)
    # The Python path of a slot whose record gives no clip, one slot at a
    # time: the stream's decode, and the decode with errors raised (what
    # made a record give no clip).
    self._decode = tf.function(self._element)
    self._strict = tf.function(
        lambda element: _train_clips(element, data, table, num_classes))
    self._max_run = int(self._data.max_consecutive_skips)
    self._data_ids = {
        'num_records': len(self._index), 'num_shards': len(self._index.files),
        'data_fingerprint': self._index.fingerprint()}
    # Set by the trainer: called while waiting for valid clips; True raises
    # Interrupted (a SIGTERM must stop a run whose data is all bad).
    self.should_stop = None

  def _dataset(self):
    """The stream: this process's slots from the next slot on, one chunk
    per global batch: the clips of each, or the marker of a record without
    any."""
    order, columns = self._order, self._columns
    slots = _process_slots(self._next_slot, self._batch_slots,
                           self._slots_per_batch)  # order
    entries = slots.map(lambda slot: _slot_entry(order, columns, slot, slot))
    read = records.read(entries, self._index)  # read
    elements = read.map(self._element,  # decode
                        num_parallel_calls=self._data.num_parallel_calls,
                        deterministic=True)
    return (elements.batch(len(self._batch_slots), drop_remainder=True)  # batch
            .prefetch(_PREFETCH_BATCHES))

  def __iter__(self):
    return self

  def _check_stop(self):
    if self.should_stop is not None and self.should_stop():
      raise Interrupted(f'stopped while reading {self._data.train_spec}')

  def _next_chunk(self):
    self._check_stop()
    if self._batches is None:
      self._batches = self._dataset().as_numpy_iterator()
    return next(self._batches)

  def __next__(self) -> dict:
    """This process's clips of the next global batch; a slot whose record
    gives no clip is filled (module doc) and counted. The state changes
    only when a batch is returned."""
    try:
      batch, skipped = self._next_batch()
    except BaseException as error:
      self._batches = None  # restart at the saved state
      if isinstance(error, tf.errors.OpError):
        raise self._unreadable(error) from error
      raise
    self._next_slot += self._slots_per_batch
    for reason, count in skipped.items():
      self.skipped[reason] += count
    self.num_skipped += sum(skipped.values())
    return _clips(batch, self._data.repeated_augment)

  def _next_batch(self) -> tuple[dict, collections.Counter]:
    """(the records of this process's next slots, the slots skipped by
    reason)."""
    chunk = self._next_chunk()
    batch = {key: chunk[key] for key in ('video', 'key', 'label')}
    bad = np.flatnonzero(chunk['reason'])
    if len(bad):
      batch = {key: value.copy() for key, value in batch.items()}
    for row in bad:
      clips = self._replacement(int(chunk['slot'][row]),
                                int(chunk['reason'][row]),
                                int(chunk['file'][row]))
      for key, value in batch.items():
        value[row] = clips[key]
    return batch, collections.Counter(chunk['reason'][bad].tolist())

  def _replacement(self, slot: int, reason: int, file: int) -> dict:
    """The clips of the first record after slot `slot` in the train order
    that gives any, with the draws of `slot` (whose own record, from shard
    number `file`, gave none, for `reason`)."""
    self._check_data_error(self._read(slot, slot))
    run = [(reason, file)]  # the records in a row without a clip
    for source in itertools.count(slot + 1):
      if len(run) >= min(self._max_run, len(self._index)):
        raise self._too_many_skips(run)
      self._check_stop()
      element = self._read(slot, source)
      clips = self._decode(element)
      if not clips['reason']:
        return {key: clips[key].numpy() for key in ('video', 'key', 'label')}
      self._check_data_error(element)
      run.append((int(clips['reason']), int(element['file'])))

  def _read(self, slot: int, source: int) -> dict:
    """Slot `slot` filled from slot `source`'s record (_read_slot)."""
    return _read_slot(self._index, self._order, self._columns, slot, source)

  def _check_data_error(self, element) -> None:
    """A read slot (_read's element) whose record gave no clip, decoded
    again with its errors raised: a data error (DATA_ERRORS) is what skips
    it; any other error, or a decode that now succeeds, is a RuntimeError
    (from the error: its traceback follows)."""
    where = (f'train record {int(element["record_number"])} of '
             f'{self._index.files[int(element["file"])]}')
    try:
      self._strict(element)
    except DATA_ERRORS:
      return
    except Exception as error:
      raise RuntimeError(f'{where}: its decode failed with '
                         f'{type(error).__name__}, not a data error; '
                         'stopping') from error
    raise RuntimeError(f'{where} gave no clip in the pipeline but decodes '
                       'on its own: the pipeline failed for a reason other '
                       'than its data')

  def _too_many_skips(self, run) -> UserError:
    run_files = collections.Counter(file for _, file in run)
    files = ', '.join(f'{self._index.files[f]} ({n})'
                      for f, n in run_files.most_common(5))
    more = len(run_files) - 5
    reasons = ', '.join(
        f'{SKIP_REASONS[r]}: {n}' for r, n in
        collections.Counter(reason for reason, _ in run).most_common())
    limit = ('as many as the index holds' if len(run) >= len(self._index)
             else f'data.max_consecutive_skips = {self._max_run}')
    return UserError(
        f'train data: {len(run)} records in a row gave no clip ({limit}); '
        f'{reasons}; from {files}{f" and {more} more shards" if more > 0 else ""}'
        f'. Check them with python -m stat_jax.data.inspect_shards')

  def _unreadable(self, error: tf.errors.OpError) -> UserError:
    """The train shards that are gone (deleted or moved during the run), or
    else what the read failed with."""
    missing = [f for f in self._index.files if not tf.io.gfile.exists(f)]
    if not missing:
      return UserError(f'train data {self._data.train_spec}: reading failed: '
                       f'{error.message.strip().splitlines()[0]}')
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    return UserError(
        f'train data: shard {missing[0]}{more} is gone (deleted or moved '
        f'while the run read it). Restore it and rerun to resume from the '
        f'last checkpoint, or resume on the shards left with '
        f'{DATA_CHANGE_KEY}=True')

  @property
  def index(self) -> records.RecordIndex:
    return self._index

  def skip_report(self) -> tuple[str, str | None]:
    """(' | skipped N (reason: n, ...)' for the progress line, '' when none;
    a warning line when more than data.skip_warning_fraction of this
    process's slots read since the previous call were skipped, else None)."""
    batches = (self._next_slot - self._report_mark[0]) // self._slots_per_batch
    read = batches * len(self._batch_slots)
    skipped = self.num_skipped - self._report_mark[1]
    self._report_mark = (self._next_slot, self.num_skipped)
    summary = self.skipped_summary()
    warning = None
    if read and skipped / read > self._data.skip_warning_fraction:
      warning = (f'warning: {skipped} of the {read} train records read since '
                 f'the previous report were skipped ({skipped / read:.0%} > '
                 f'data.skip_warning_fraction = '
                 f'{self._data.skip_warning_fraction}); check '
                 f'{self._data.train_spec} with python -m stat_jax.data.inspect_shards')
    return (f' | skipped {summary}' if summary else ''), warning

  def skipped_summary(self) -> str:
    """'N (reason: n, ...)' of the records skipped so far, or ''."""
    if not self.num_skipped:
      return ''
    return f'{self.num_skipped} (' + ', '.join(
        f'{SKIP_REASONS[r]}: {n}' for r, n in self.skipped.items() if n) + ')'

  # ------------------------------------------------------ state and resume ---

  def get_state(self) -> dict:
    """Small ints: the next slot (as epoch, position), this process's skip
    counters, and what a resume must match."""
    epoch, position = self._order.epoch_position(self._next_slot)
    return {'order': ORDER_VERSION, 'epoch': epoch, 'position': position,
            'num_skipped': self.num_skipped, 'seed': self._seed,
            **self._data_ids,
            **{_SKIP_KEYS[r]: n for r, n in self.skipped.items()}}

  def set_state(self, states: list[dict], *, allow_data_change: bool = False):
    """Resume where `states`, the data states of every process that saved
    (any number of them), say: their common position; the sums of their
    skip counters go to process 0. A state of other train data (shards
    added or removed: other record count or index fingerprint) is refused
    unless `allow_data_change` (then the position is kept where it fits)."""
    state, expected = _agreed_state(states), self.get_state()
    if int(state['seed']) != self._seed:
      raise UserError(f'iterator state seed: expected {self._seed}, '
                       f'got {state["seed"]}')
    changed = [key for key in self._data_ids
               if int(state[key]) != expected[key]]
    if changed and not allow_data_change:
      raise UserError(
          f'data.train_spec {self._data.train_spec!r} now gives '
          f'{expected["num_records"]} records in {expected["num_shards"]} '
          f'shard(s); the checkpoint was written reading '
          f'{state["num_records"]} records in {state["num_shards"]} '
          f'shard(s) (differs: {", ".join(changed)}). Restore the shards, or set '
          f'{DATA_CHANGE_KEY}=True to resume on the new data on purpose')
    epoch, position = int(state['epoch']), int(state['position'])
    if changed and position >= len(self._index):
      epoch, position = epoch + 1, 0
    if not 0 <= position < len(self._index):
      raise UserError(f'iterator state position: expected 0..'
                       f'{len(self._index) - 1}, got {position}')
    self._next_slot = self._order.slot(epoch, position)
    counters = ('num_skipped', *_SKIP_KEYS.values())
    totals = {key: sum(int(s.get(key, 0)) for s in states) for key in counters}
    if self._process_index:
      totals = dict.fromkeys(counters, 0)
    self.num_skipped = totals['num_skipped']
    self.skipped = {r: totals[key] for r, key in _SKIP_KEYS.items()}
    self._report_mark = (self._next_slot, self.num_skipped)
    self._batches = None


def _agreed_state(states: list[dict]) -> dict:
  """The data state that every process saved (they agree on _GLOBAL_KEYS);
  UserError for states of the older per-process order, or that disagree."""
  if any(int(state.get('order', 1)) != ORDER_VERSION for state in states):
    raise UserError(
        'the checkpoint\'s data state was written by an older stat-jax, whose '
        'processes each read their own part of the train data; this one '
        'reads one global order and cannot continue it exactly. Resume it '
        'with the stat-jax that wrote it, or start a new workdir')
  differ = [key for key in _GLOBAL_KEYS
            if len({int(state[key]) for state in states}) > 1]
  if differ:
    raise UserError(f'the data states of the {len(states)} processes that '
                     f'saved the checkpoint disagree on {", ".join(differ)}: '
                     f'{[{key: s[key] for key in differ} for s in states]}')
  return states[0]


def make_train_iterator(config, *, process_index=0, process_count=1,
                        rows=None) -> TrainIterator:
  """Train batches for this process (see TrainIterator)."""
  return TrainIterator(config, process_index, process_count, rows)
