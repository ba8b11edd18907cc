"""The converter on tiny mp4/webm files encoded here with PyAV."""

import json
import os

import av
import numpy as np
import pytest

from stat_jax.data import convert
from stat_jax.data import dmvr
from stat_jax.data import inspect_shards


def _write_video(path, codec, num_frames=10, width=48, height=36, rate=10):
  """Frame t is uniformly grey 20 * t."""
  with av.open(path, 'w') as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    for t in range(num_frames):
      image = np.full((height, width, 3), 20 * t, np.uint8)
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _records(spec):
  return [dmvr.parse_example(r) for f in dmvr.resolve_spec(spec)
          for r in dmvr.read_records(f)]


@pytest.fixture
def data_kinetics(tmp_path):
  videos = tmp_path / 'videos'
  videos.mkdir()
  _write_video(str(videos / 'abc_000010_000020.mp4'), 'mpeg4')
  _write_video(str(videos / 'xyz_000000_000010.mp4'), 'mpeg4', 6, 36, 48)
  (videos / 'bad_000001_000011.mp4').write_bytes(b'not a video at all')
  rows = ['label,youtube_id,time_start,time_end,split',
          'swim,abc,10,20,train', 'run,bad,1,11,train',
          'run,xyz,0,10,train', 'swim,gone,3,13,train']
  (tmp_path / 'k.csv').write_text('\n'.join(rows) + '\n')
  return tmp_path


def test_kinetics_csv_converts_and_lists_skipped(data_kinetics):
  videos, names = convert.read_kinetics_csv(str(data_kinetics / 'k.csv'),
                                            str(data_kinetics / 'videos'))
  assert names == ['run', 'swim']
  assert os.path.basename(videos[0].path) == 'abc_000010_000020.mp4'
  out = str(data_kinetics / 'out')
  summary = convert.convert(videos, names, out, num_shards=2, short_side=24)
  assert (summary['converted'], summary['skipped']) == (2, 2)
  skipped = open(summary['skipped_list']).read().splitlines()
  assert [line.split('\t')[0] for line in skipped] == [videos[1].path,
                                                       videos[3].path]
  assert all(line.split('\t')[1] for line in skipped)  # a reason each
  assert dmvr.load_label_map(os.path.join(out, 'label_map.txt')) == names
  clips = {c.filename: c for c in _records(summary['spec'])}
  wide = clips['abc_000010_000020.mp4']
  assert (wide.label_indices, wide.label_texts) == ([1], ['swim'])
  assert (wide.start_us, wide.end_us) == (10_000_000, 20_000_000)
  stats = inspect_shards.inspect_spec(summary['spec'], full=True)
  assert stats['clips'] == 2 and stats['skipped'] == 0
  assert stats['resolutions'] == {'24x32': 1, '32x24': 1}
  assert stats['frames'] == {'min': 6, 'median': 8.0, 'max': 10}


def test_frames_keep_their_content_and_order(tmp_path):
  path = str(tmp_path / 'v.webm')
  _write_video(path, 'libvpx', num_frames=8, rate=8)
  frames = convert.decode_video(path, 18)
  assert frames.shape == (8, 18, 24, 3)
  np.testing.assert_allclose(frames.mean((1, 2, 3)), 20 * np.arange(8),
                             atol=6)
  half = convert.decode_video(path, 18, fps=4)
  np.testing.assert_allclose(half.mean((1, 2, 3)), 40 * np.arange(4), atol=6)


def test_ssv2_json_labels(tmp_path):
  _write_video(str(tmp_path / '7.webm'), 'libvpx', num_frames=4)
  (tmp_path / 'labels.json').write_text(json.dumps(
      {'Pushing something from left to right': '1',
       'Holding something': '0'}))
  (tmp_path / 'train.json').write_text(json.dumps([
      {'id': '7', 'template': 'Pushing [something] from left to right',
       'placeholders': ['a cup']}]))
  videos, names = convert.read_ssv2_json(str(tmp_path / 'train.json'),
                                         str(tmp_path / 'labels.json'),
                                         str(tmp_path))
  assert names == ['Holding something', 'Pushing something from left to right']
  assert (videos[0].label, videos[0].path) == (1, str(tmp_path / '7.webm'))


def test_plain_csv_command_line_parallel_matches_serial(tmp_path, capsys):
  for i in range(3):
    _write_video(str(tmp_path / f'{i}.mp4'), 'mpeg4', num_frames=3 + i)
  (tmp_path / 'list.csv').write_text('path,label\n0.mp4,2\n1.mp4,0\n2.mp4,2\n')
  specs = []
  for workers in (1, 2):
    out = str(tmp_path / f'out{workers}')
    convert.main(['--videos', str(tmp_path), '--csv', str(tmp_path /
                  'list.csv'), '--out', out, '--num_shards', '2',
                  '--short_side', '16', '--workers', str(workers)])
    specs.append(f'{out}/train.tfrecord@2')
  assert 'converted 3 videos, skipped 0' in capsys.readouterr().out
  serial, parallel = (_records(spec) for spec in specs)
  assert [c.frames for c in serial] == [c.frames for c in parallel]
  assert sorted(c.label_indices[0] for c in serial) == [0, 2, 2]
  assert dmvr.load_label_map(f'{tmp_path}/out1/label_map.txt') == [
      '0', '1', '2']


def test_inspect_json_counts_bad_records(tmp_path, capsys):
  prefix = str(tmp_path / 'x.tfrecord')
  jpeg = dmvr.encode_frames(np.zeros((1, 8, 8, 3), np.uint8))[0]
  with dmvr.ShardedWriter(prefix, 1) as writer:
    writer.write(0, dmvr.make_example([jpeg] * 3, 4).SerializeToString())
    writer.write(0, b'garbage')
    writer.write(0, dmvr.make_example([jpeg, jpeg[:30]], 4).SerializeToString())
  inspect_shards.main([prefix + '@1', '--json'])
  stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (stats['clips'], stats['skipped'], stats['labels']) == (1, 2,
                                                                 {'4': 1})
