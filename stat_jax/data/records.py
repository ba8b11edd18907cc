"""The record index of a DMVR shard spec, and reading records by it.

Every shard is indexed into (file, offset, length) triples, so a pipeline
can order, skip and split records by number and read each one alone
(FixedLengthRecordDataset at its offset): resuming skips index entries,
never data. A shard's triples come from its index file (stat_jax/data/dmvr.py); a
shard without one, or whose one no longer fits it, is indexed by a header
scan, its index file written for the next start, with one warning line for
the spec.
"""

import concurrent.futures
import sys
import zlib

import numpy as np
import tensorflow as tf

from stat_jax.data import dmvr
from stat_jax import storage
from stat_jax.checks.errors import UserError

READ_PARALLELISM = 8  # records read concurrently by read()


class RecordIndex:
  """All records of a shard spec: files, file sizes, and per record the file
  number, data offset and data length (int64 [n] each), in file order."""

  def __init__(self, spec: str):
    self.files = dmvr.resolve_spec(spec)
    self.sizes = np.array([tf.io.gfile.stat(f).length for f in self.files],
                          np.int64)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      tables, problems = zip(*pool.map(shard_table, self.files, self.sizes))
    _warn_rebuilt(spec, [p for p in problems if p])
    self.file = np.concatenate([np.full(len(t), i, np.int64)
                                for i, t in enumerate(tables)])
    rows = np.concatenate(tables)  # [n, 2]
    self.offset, self.length = rows[:, 0], rows[:, 1]
    if not len(self.file):
      raise UserError(f'shard spec {spec!r}: no records in {self.files}')

  def __len__(self):
    return len(self.file)

  def fingerprint(self) -> int:
    """A 31-bit hash of the shard names, sizes and record counts (fits the
    int32 of a checkpoint's data state)."""
    counts = np.bincount(self.file, minlength=len(self.files))
    text = '\n'.join(f'{storage.basename(f)} {size} {count}' for f, size, count
                     in zip(self.files, self.sizes, counts))
    return zlib.crc32(text.encode()) & 0x7fffffff

  def entries(self, records: np.ndarray) -> dict:
    """The read arguments of the given record numbers."""
    return {'file': self.file[records], 'offset': self.offset[records],
            'length': self.length[records]}

  def read(self, record: int) -> bytes:
    """Record number `record`, read alone (tf.errors.NotFoundError when its
    shard is gone)."""
    with tf.io.gfile.GFile(self.files[self.file[record]], 'rb') as f:
      f.seek(int(self.offset[record]))
      return f.read(int(self.length[record]))


def shard_table(path: str, size: int) -> tuple[np.ndarray, str | None]:
  """(the shard's (offset, length) rows, None), from its index file; or,
  where that is missing or stale, (the rows of a header scan, why), the
  index file written anew (if the folder is writable)."""
  try:
    return dmvr.read_shard_index(path, size), None
  except dmvr.StaleIndex as stale:
    problem = str(stale)
  rows = dmvr.index_shard(path)
  try:
    dmvr.write_shard_index(path, rows, size)
  except tf.errors.OpError as error:
    problem += f'; not rewritten: {error.message}'
  return rows, problem


def _warn_rebuilt(spec: str, problems: list[str]) -> None:
  if problems:
    print(f'warning: shard spec {spec!r}: indexed {len(problems)} shard(s) '
          f'by a header scan, their index files missing or stale (e.g. '
          f'{problems[0]})', file=sys.stderr, flush=True)


def record_reader(index: RecordIndex):
  """entry -> a dataset of one element: the entry plus 'record' (bytes)."""
  files = tf.constant(index.files)
  sizes = tf.constant(index.sizes)

  def read_one(entry):
    footer = tf.gather(sizes, entry['file']) - entry['offset'] - entry['length']
    records = tf.data.FixedLengthRecordDataset(
        tf.gather(files, entry['file']), record_bytes=entry['length'],
        header_bytes=entry['offset'], footer_bytes=footer)
    return records.map(lambda record: dict(entry, record=record))

  return read_one


def read(entries: tf.data.Dataset, index: RecordIndex) -> tf.data.Dataset:
  """Adds 'record' (bytes) to each element holding file/offset/length."""
  return entries.interleave(record_reader(index),
                            cycle_length=READ_PARALLELISM,
                            num_parallel_calls=tf.data.AUTOTUNE,
                            deterministic=True)
