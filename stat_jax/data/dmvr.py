"""DMVR-compatible SequenceExample codec, sharded-file specs and record index.

Each shard's record index, (data offset, data length) per record, is kept in
`<shard>.index` beside it (written by ShardedWriter, else after the first
header scan), so a start reads one small file per shard instead of every
record header.

Layout (docs/design.md#record-format), one `tf.train.SequenceExample` per clip:
  feature_lists `image/encoded`: one JPEG per frame (the older layout with all
    frames as values of one feature, in feature_lists or context, also parses);
  context `clip/label/index` (int64), `clip/label/text` (bytes; MediaSequence's
    `clip/label/string` also parses), `video/filename` (bytes), optional
    `clip/start/timestamp`, `clip/end/timestamp` (int64, microseconds).
"""

import dataclasses
import functools
import glob
import io
import re
import struct
from typing import Sequence

import numpy as np
import tensorflow as tf

from stat_jax import storage
from stat_jax.checks.errors import UserError

IMAGE_KEY = 'image/encoded'
LABEL_INDEX_KEY = 'clip/label/index'
LABEL_TEXT_KEY = 'clip/label/text'
LABEL_STRING_KEY = 'clip/label/string'  # MediaSequence spelling
FILENAME_KEY = 'video/filename'
START_KEY = 'clip/start/timestamp'
END_KEY = 'clip/end/timestamp'

# TFRecord framing: u64 length, u32 masked crc of length, data, u32 crc of data.
_HEADER_BYTES = 12
_FOOTER_BYTES = 4


@dataclasses.dataclass
class Clip:
  """One parsed record (host side; the tf.data path uses `parse_tf`)."""
  frames: list  # JPEG bytes, one per frame
  label_indices: list
  label_texts: list
  filename: str
  start_us: int | None = None
  end_us: int | None = None


# ----------------------------------------------------------------- writing ---

@functools.cache
def _jpeg_encoder(quality: int):
  """A traced [T, H, W, 3] uint8 -> [T] JPEG encoder (quality is an attribute)."""
  return tf.function(lambda frames: tf.map_fn(
      lambda f: tf.io.encode_jpeg(f, quality=quality), frames,
      fn_output_signature=tf.string), reduce_retracing=True)


def encode_frames(frames: np.ndarray, quality: int = 90) -> list:
  """uint8 [T, H, W, 3] -> list of T JPEG byte strings."""
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f'frames: expected uint8 [T, H, W, 3], got {frames.dtype} '
                     f'{list(frames.shape)}')
  return list(_jpeg_encoder(int(quality))(frames).numpy())


def _bytes(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _ints(values):
  return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def make_example(jpeg_frames: Sequence[bytes], label_index: int | Sequence[int],
                 label_text: str | Sequence[str] = (), filename: str = '',
                 start_us: int | None = None, end_us: int | None = None,
                 legacy: bool = False) -> tf.train.SequenceExample:
  """A DMVR SequenceExample; `legacy` puts all frames in one feature."""
  indices = [label_index] if isinstance(label_index, int) else list(label_index)
  texts = [label_text] if isinstance(label_text, str) else list(label_text)
  ex = tf.train.SequenceExample()
  ctx = ex.context.feature
  ctx[LABEL_INDEX_KEY].CopyFrom(_ints(indices))
  if texts:
    ctx[LABEL_TEXT_KEY].CopyFrom(_bytes([t.encode() for t in texts]))
  ctx[FILENAME_KEY].CopyFrom(_bytes([filename.encode()]))
  if start_us is not None:
    ctx[START_KEY].CopyFrom(_ints([start_us]))
  if end_us is not None:
    ctx[END_KEY].CopyFrom(_ints([end_us]))
  frame_list = ex.feature_lists.feature_list[IMAGE_KEY].feature
  if legacy:
    frame_list.add().CopyFrom(_bytes(list(jpeg_frames)))
  else:
    for jpeg in jpeg_frames:
      frame_list.add().CopyFrom(_bytes([jpeg]))
  return ex


# ----------------------------------------------------------------- parsing ---

def parse_example(serialized: bytes) -> Clip:
  """Host-side parse of every layout; ValueError when it is not a clip."""
  try:
    ex = tf.train.SequenceExample.FromString(serialized)
  except Exception as e:  # protobuf's DecodeError has no stable import path
    raise ValueError(f'not a SequenceExample: {e}') from e
  ctx = ex.context.feature
  frames = list(ctx[IMAGE_KEY].bytes_list.value) if IMAGE_KEY in ctx else []
  if IMAGE_KEY in ex.feature_lists.feature_list:
    for feature in ex.feature_lists.feature_list[IMAGE_KEY].feature:
      frames.extend(feature.bytes_list.value)
  if not frames:
    raise ValueError(f'no frames under {IMAGE_KEY!r}')

  def ints(key):
    return list(ctx[key].int64_list.value) if key in ctx else []

  def strs(key):
    return [v.decode('utf-8', 'replace') for v in ctx[key].bytes_list.value
           ] if key in ctx else []

  start, end = ints(START_KEY), ints(END_KEY)
  return Clip(frames=frames, label_indices=ints(LABEL_INDEX_KEY),
              label_texts=strs(LABEL_TEXT_KEY) or strs(LABEL_STRING_KEY),
              filename=(strs(FILENAME_KEY) or [''])[0],
              start_us=start[0] if start else None,
              end_us=end[0] if end else None)


_CONTEXT_FEATURES = {
    IMAGE_KEY: tf.io.VarLenFeature(tf.string),
    LABEL_INDEX_KEY: tf.io.VarLenFeature(tf.int64),
    LABEL_TEXT_KEY: tf.io.VarLenFeature(tf.string),
    LABEL_STRING_KEY: tf.io.VarLenFeature(tf.string),
}
_SEQUENCE_FEATURES = {IMAGE_KEY: tf.io.VarLenFeature(tf.string)}


def parse_tf(serialized: tf.Tensor) -> dict:
  """Graph parse: {'frames': string [N], 'label_index': int64 [k],
  'label_text': string [k']}. Raises InvalidArgumentError (the pipeline skips
  and counts the record) on a malformed proto or a clip without frames."""
  ctx, seq = tf.io.parse_single_sequence_example(
      serialized, context_features=_CONTEXT_FEATURES,
      sequence_features=_SEQUENCE_FEATURES)
  # Sparse [steps, values] -> row-major values = frame order for both layouts.
  frames = tf.concat([ctx[IMAGE_KEY].values, seq[IMAGE_KEY].values], axis=0)
  tf.debugging.assert_positive(tf.size(frames), message='record has no frames')
  texts = tf.concat([ctx[LABEL_TEXT_KEY].values,
                     ctx[LABEL_STRING_KEY].values], axis=0)
  return {'frames': frames, 'label_index': ctx[LABEL_INDEX_KEY].values,
          'label_text': texts}


# ------------------------------------------------------------ shard specs ---

def sharded_filenames(prefix: str, num_shards: int) -> list:
  """`<prefix>-00000-of-000NN` ... (the Google sharded-file convention)."""
  return [f'{prefix}-{i:05d}-of-{num_shards:05d}' for i in range(num_shards)]


def resolve_spec(spec: str) -> list:
  """Files of a shard spec: `prefix@N`, a glob, or a comma-separated list of
  either (in the given order; a glob's matches sorted)."""
  files = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    match = re.fullmatch(r'(.+)@(\d+)', part)
    if match:
      names = sharded_filenames(match.group(1), int(match.group(2)))
      missing = [n for n in names if not tf.io.gfile.exists(n)]
      if missing:
        raise FileNotFoundError(f'spec {part!r}: {len(missing)} of {len(names)}'
                                f' shards missing, e.g. {missing[0]}')
      files.extend(names)
    elif glob.has_magic(part):
      matches = sorted(f for f in tf.io.gfile.glob(part)
                       if not INDEX_FILE.search(f))
      if not matches:
        raise FileNotFoundError(f'spec {part!r}: glob matches no file')
      files.extend(matches)
    else:
      if not tf.io.gfile.exists(part):
        raise FileNotFoundError(f'spec {part!r}: no such file')
      files.append(part)
  if not files:
    raise UserError(f'shard spec {spec!r} names no file')
  return files


def spec_directory(spec: str) -> str:
  """The folder of a spec's first file (where label_map.txt lives)."""
  return storage.parent(resolve_spec(spec)[0])


class ShardedWriter:
  """Writes serialized records to `<prefix>-XXXXX-of-NNNNN` files, and on
  close each file's record index beside it."""

  def __init__(self, prefix: str, num_shards: int):
    if num_shards < 1:
      raise ValueError(f'num_shards: expected >= 1, got {num_shards}')
    self.filenames = sharded_filenames(prefix, num_shards)
    self.spec = f'{prefix}@{num_shards}'
    storage.make_folder(storage.parent(prefix) or '.')
    self._writers = [tf.io.TFRecordWriter(f) for f in self.filenames]
    self._rows = [[] for _ in self.filenames]  # (data offset, length)
    self._sizes = [0] * num_shards

  def write(self, shard: int, record: bytes):
    self._writers[shard].write(record)
    self._rows[shard].append((self._sizes[shard] + _HEADER_BYTES, len(record)))
    self._sizes[shard] += _HEADER_BYTES + len(record) + _FOOTER_BYTES

  def close(self):
    for w in self._writers:
      w.close()
    for path, rows, size in zip(self.filenames, self._rows, self._sizes):
      write_shard_index(path, np.array(rows, np.int64).reshape(-1, 2), size)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------ record index ---

def index_shard(path: str) -> np.ndarray:
  """int64 [num_records, 2] of (data offset, data length) from a header scan.

  Raises ValueError naming the file and offset when the framing is truncated.
  """
  size = tf.io.gfile.stat(path).length
  rows, offset = [], 0
  with tf.io.gfile.GFile(path, 'rb') as f:
    while offset < size:
      header = f.read(_HEADER_BYTES)
      if len(header) < _HEADER_BYTES:
        raise ValueError(f'{path}: truncated record header at byte {offset}')
      (length,) = struct.unpack('<Q', header[:8])
      end = offset + _HEADER_BYTES + length + _FOOTER_BYTES
      if end > size:
        raise ValueError(f'{path}: record at byte {offset} claims {length} '
                         f'bytes, file has {size - offset - _HEADER_BYTES}')
      rows.append((offset + _HEADER_BYTES, length))
      offset = end
      f.seek(offset)
  return np.array(rows, np.int64).reshape(-1, 2)


def read_records(path: str):
  """Yields the raw record bytes of one TFRecord file (no proto parsing)."""
  for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
    yield record


def load_label_map(path: str) -> list:
  """Class names, one a line; the line index is the label."""
  with tf.io.gfile.GFile(path) as f:
    return [line.rstrip('\n') for line in f if line.strip()]


def write_label_map(path: str, names: Sequence[str]):
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(''.join(f'{n}\n' for n in names))


# ------------------------------------------------------ record index files ---

INDEX_SUFFIX = '.index'
# An index file, or one being written, which a shard glob must not match.
INDEX_FILE = re.compile(r'\.index(\.tmp-[0-9a-f]+)?$')


class StaleIndex(Exception):
  """A shard's index file is missing or does not describe the shard."""


def write_shard_index(path: str, rows: np.ndarray, size: int) -> None:
  """Writes `<path>.index`: the rows of index_shard and the shard's size.
  Whole or not at all (a reader never sees half a file)."""
  buffer = io.BytesIO()
  np.savez(buffer, rows=rows, shard_bytes=np.int64(size))
  storage.write_bytes(path + INDEX_SUFFIX, buffer.getvalue())


def read_shard_index(path: str, size: int) -> np.ndarray:
  """The rows of index_shard, from `<path>.index`; StaleIndex (the reason)
  when it is missing or does not fit the shard of `size` bytes: its
  recorded size, its last record's end, and the length fields of its first
  and last record headers must match."""
  index = path + INDEX_SUFFIX
  try:
    with tf.io.gfile.GFile(index, 'rb') as f:
      saved = np.load(io.BytesIO(f.read()), allow_pickle=False)
      rows, saved_size = saved['rows'], int(saved['shard_bytes'])
  except tf.errors.NotFoundError as error:
    raise StaleIndex(f'{index}: missing') from error
  except (OSError, ValueError, KeyError) as error:
    raise StaleIndex(f'{index}: unreadable ({error})') from error
  if saved_size != size:
    raise StaleIndex(f'{index}: written for {saved_size} bytes, the shard '
                     f'has {size}')
  if rows.ndim != 2 or rows.shape[1] != 2 or not _fits_headers(path, rows,
                                                               size):
    raise StaleIndex(f'{index}: its records do not match the shard\'s')
  return rows


def _fits_headers(path: str, rows: np.ndarray, size: int) -> bool:
  """Whether the first and last indexed records are framed as the shard's
  record headers say, the last one ending the file."""
  if not len(rows):
    return size == 0
  (first, _), (last, last_length) = rows[0], rows[-1]
  if first != _HEADER_BYTES or last + last_length + _FOOTER_BYTES != size:
    return False
  with tf.io.gfile.GFile(path, 'rb') as f:
    for offset, length in (rows[0], rows[-1]):
      f.seek(int(offset) - _HEADER_BYTES)
      if struct.unpack('<Q', f.read(8))[0] != length:
        return False
  return True
