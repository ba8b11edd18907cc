"""Record index files (stat_jax/data/dmvr.py, stat_jax/data/records.py): written beside each
shard, read at start-up instead of a header scan, and rebuilt, with one
warning line, when missing or no longer fitting the shard. The reference
is always dmvr.index_shard, the header scan itself."""

import os

import numpy as np
import tensorflow as tf

from stat_jax.data import dmvr, records

PAYLOADS = [b'a' * 10, b'', b'bb' * 40, b'c' * 5, b'd' * 7]


def write_shards(prefix: str, num_shards: int) -> list[str]:
  with dmvr.ShardedWriter(prefix, num_shards) as writer:
    for i, payload in enumerate(PAYLOADS):
      writer.write(i % num_shards, payload)
  return writer.filenames


def write_plain(path: str, payloads) -> None:
  """A shard as other tools write it: no index file."""
  with tf.io.TFRecordWriter(path) as writer:
    for payload in payloads:
      writer.write(payload)


def index_entries(spec: str) -> list[tuple[int, int, int]]:
  index = records.RecordIndex(spec)
  return [tuple(map(int, entry))
          for entry in zip(index.file, index.offset, index.length)]


def scanned_entries(files) -> list[tuple[int, int, int]]:
  return [(i, int(offset), int(length)) for i, path in enumerate(files)
          for offset, length in dmvr.index_shard(path)]


def forbid_scans(monkeypatch):
  def scan(path):
    raise AssertionError(f'{path} was scanned')
  monkeypatch.setattr(dmvr, 'index_shard', scan)


def test_the_writer_indexes_each_shard_as_a_header_scan_does(tmp_path):
  # 6 shards for 5 records: the last one is empty.
  files = write_shards(str(tmp_path / 'train.tfrecord'), 6)
  assert os.path.getsize(files[-1]) == 0
  for path in files:
    np.testing.assert_array_equal(
        dmvr.read_shard_index(path, os.path.getsize(path)),
        dmvr.index_shard(path))


def test_a_start_reads_the_index_files_not_the_headers(tmp_path, capsys,
                                                       monkeypatch):
  files = write_shards(str(tmp_path / 'train.tfrecord'), 2)
  expected = scanned_entries(files)
  forbid_scans(monkeypatch)
  assert index_entries(str(tmp_path / 'train.tfrecord@2')) == expected
  assert capsys.readouterr().err == ''


def test_shards_from_elsewhere_are_indexed_once_with_a_warning(
    tmp_path, capsys, monkeypatch):
  files = [str(tmp_path / f'part{i}.tfrecord') for i in range(3)]
  for i, path in enumerate(files):
    write_plain(path, PAYLOADS[i:])
  expected = scanned_entries(files)
  spec = str(tmp_path / 'part*')  # a glob that matches the index files too
  assert index_entries(spec) == expected
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f'warning: shard spec {spec!r}: indexed 3 shard(s) '
                         'by a header scan')
  assert 'part0.tfrecord.index: missing' in line
  assert sorted(os.listdir(tmp_path)) == sorted(
      [f'part{i}.tfrecord{end}' for i in range(3) for end in ('', '.index')])
  forbid_scans(monkeypatch)
  assert index_entries(spec) == expected
  assert capsys.readouterr().err == ''


def one_indexed_shard(tmp_path, payloads) -> tuple[str, str]:
  """(spec, path) of one shard written by ShardedWriter (so indexed)."""
  prefix = str(tmp_path / 'train.tfrecord')
  with dmvr.ShardedWriter(prefix, 1) as writer:
    for payload in payloads:
      writer.write(0, payload)
  return prefix + '@1', writer.filenames[0]


def reindexed_after_rewrite(spec, path, payloads, capsys) -> str:
  """The shard rewritten by another tool with `payloads`: asserts that the
  start indexes it as the header scan does; its warning line."""
  os.remove(path)
  write_plain(path, payloads)
  entries = index_entries(spec)
  assert entries == scanned_entries([path])
  assert [length for _, _, length in entries] == [len(p) for p in payloads]
  (line,) = capsys.readouterr().err.splitlines()
  assert 'indexed 1 shard(s) by a header scan' in line
  return line


def test_a_shard_that_grew_is_indexed_anew(tmp_path, capsys):
  spec, path = one_indexed_shard(tmp_path, PAYLOADS)
  line = reindexed_after_rewrite(spec, path, PAYLOADS + [b'new'], capsys)
  size = os.path.getsize(path)
  assert f'written for {size - 19} bytes, the shard has {size}' in line


def test_a_shard_of_the_same_size_framed_otherwise_is_indexed_anew(
    tmp_path, capsys):
  spec, path = one_indexed_shard(tmp_path, [b'a' * 10, b'b' * 5])
  line = reindexed_after_rewrite(spec, path, [b'x' * 5, b'y' * 10], capsys)
  assert "its records do not match the shard's" in line


def test_an_unreadable_index_file_is_replaced(tmp_path, capsys, monkeypatch):
  spec, path = one_indexed_shard(tmp_path, PAYLOADS)
  with open(path + '.index', 'wb') as f:
    f.write(b'not an index')
  expected = scanned_entries([path])
  assert index_entries(spec) == expected
  assert 'train.tfrecord-00000-of-00001.index: unreadable' in (
      capsys.readouterr().err)
  forbid_scans(monkeypatch)  # the next start reads the new index file
  assert index_entries(spec) == expected
  assert capsys.readouterr().err == ''


def test_an_index_that_cannot_be_written_is_named_in_the_warning(
    tmp_path, capsys, monkeypatch):
  path = str(tmp_path / 'foreign.tfrecord')
  write_plain(path, PAYLOADS)
  def refuse(path, rows, size):
    raise tf.errors.PermissionDeniedError(None, None, f'{path}: read-only')
  monkeypatch.setattr(dmvr, 'write_shard_index', refuse)
  assert index_entries(path) == scanned_entries([path])
  assert 'missing; not rewritten: ' in capsys.readouterr().err
