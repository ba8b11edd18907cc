"""The DMVR codec: round trips, every layout variant, specs, record index."""

import os

import numpy as np
import pytest
import tensorflow as tf

import data_testlib
from stat_jax.data import dmvr


def _jpegs(count):
  return dmvr.encode_frames(data_testlib.level_clip(count))


def test_example_round_trip():
  jpegs = _jpegs(5)
  example = dmvr.make_example(jpegs, [3, 7], ['run', 'jump'], 'a/b.mp4',
                              start_us=1_000_000, end_us=11_000_000)
  clip = dmvr.parse_example(example.SerializeToString())
  assert clip.frames == jpegs
  assert clip.label_indices == [3, 7]
  assert clip.label_texts == ['run', 'jump']
  assert clip.filename == 'a/b.mp4'
  assert (clip.start_us, clip.end_us) == (1_000_000, 11_000_000)


def test_one_jpeg_per_frame_feature():
  example = dmvr.make_example(_jpegs(4), 0)
  features = example.feature_lists.feature_list[dmvr.IMAGE_KEY].feature
  assert [len(f.bytes_list.value) for f in features] == [1, 1, 1, 1]


def test_encoded_frames_decode_back():
  frames = data_testlib.level_clip(6)
  decoded = np.stack([tf.io.decode_jpeg(j).numpy()
                      for j in dmvr.encode_frames(frames)])
  np.testing.assert_allclose(decoded, frames, atol=2)


def test_legacy_layout_parses_on_host_and_in_graph():
  jpegs = _jpegs(6)
  legacy = dmvr.make_example(jpegs, 2, legacy=True).SerializeToString()
  assert dmvr.parse_example(legacy).frames == jpegs
  parsed = dmvr.parse_tf(tf.constant(legacy))
  assert parsed['frames'].numpy().tolist() == jpegs
  assert parsed['label_index'].numpy().tolist() == [2]


def test_context_frames_and_mediasequence_label_string():
  jpegs = _jpegs(3)
  example = tf.train.SequenceExample()
  ctx = example.context.feature
  ctx[dmvr.IMAGE_KEY].bytes_list.value.extend(jpegs)
  ctx[dmvr.LABEL_STRING_KEY].bytes_list.value.append(b'swim')
  serialized = example.SerializeToString()
  clip = dmvr.parse_example(serialized)
  assert clip.frames == jpegs and clip.label_texts == ['swim']
  assert clip.label_indices == []
  parsed = dmvr.parse_tf(tf.constant(serialized))
  assert parsed['frames'].numpy().tolist() == jpegs
  assert parsed['label_text'].numpy().tolist() == [b'swim']


def test_graph_parse_matches_host_parse():
  serialized = dmvr.make_example(_jpegs(7), 4, 'x').SerializeToString()
  parsed = dmvr.parse_tf(tf.constant(serialized))
  assert parsed['frames'].numpy().tolist() == dmvr.parse_example(
      serialized).frames
  assert parsed['label_text'].numpy().tolist() == [b'x']


@pytest.mark.parametrize('record', [b'garbage bytes', b''])
def test_bad_records_fail_loudly(record):
  with pytest.raises(ValueError):
    dmvr.parse_example(record)
  with pytest.raises(tf.errors.InvalidArgumentError):
    dmvr.parse_tf(tf.constant(record))


def test_sharded_names_and_specs(tmp_path):
  prefix = str(tmp_path / 'train.tfrecord')
  with dmvr.ShardedWriter(prefix, 3) as writer:
    for shard in range(3):
      writer.write(shard, b'x')
  names = [os.path.basename(f) for f in writer.filenames]
  assert names == ['train.tfrecord-00000-of-00003',
                   'train.tfrecord-00001-of-00003',
                   'train.tfrecord-00002-of-00003']
  assert writer.spec == prefix + '@3'
  assert dmvr.resolve_spec(prefix + '@3') == writer.filenames
  assert dmvr.resolve_spec(prefix + '-*') == writer.filenames
  listed = f'{writer.filenames[2]},{writer.filenames[0]}'
  assert dmvr.resolve_spec(listed) == [writer.filenames[2],
                                       writer.filenames[0]]
  with pytest.raises(FileNotFoundError, match='4 of 4 shards missing'):
    dmvr.resolve_spec(prefix + '@4')
  with pytest.raises(FileNotFoundError, match='matches no file'):
    dmvr.resolve_spec(str(tmp_path / 'val*'))


def test_index_matches_records(tmp_path):
  path = str(tmp_path / 'a.tfrecord')
  payloads = [b'', b'a', b'hello world' * 50, bytes(range(256))]
  with tf.io.TFRecordWriter(path) as writer:
    for payload in payloads:
      writer.write(payload)
  index = dmvr.index_shard(path)
  assert index.shape == (4, 2)
  raw = open(path, 'rb').read()
  assert [raw[o:o + n] for o, n in index] == payloads
  assert list(dmvr.read_records(path)) == payloads


def test_index_names_file_of_truncated_shard(tmp_path):
  path = str(tmp_path / 'cut.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(b'x' * 100)
  raw = open(path, 'rb').read()
  open(path, 'wb').write(raw[:-10])
  with pytest.raises(ValueError, match='cut.tfrecord: record at byte 0'):
    dmvr.index_shard(path)


def test_label_map_round_trip(tmp_path):
  path = str(tmp_path / 'label_map.txt')
  dmvr.write_label_map(path, ['a b', 'c'])
  assert dmvr.load_label_map(path) == ['a b', 'c']
