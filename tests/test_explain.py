"""stat_jax.explain and the attention capture (stat_jax/attention_maps.py):
where STA's attention mass goes, that capturing it changes nothing, and the
pictures of a tiny run."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import export_testlib
import video_testlib
from stat_jax.data import dmvr, synthetic
from stat_jax import attention, attention_maps, confusion, explain
from stat_jax.deploy import inference

NT, HEADS, NQ, N_CA, N_SA, D = 6, 2, 3, 4, 2, 8
masses_of = jax.jit(attention.attention_masses,
                    static_argnames=('attention', 'window', 'num_summary'))


def random_sets(seed=0, batch=1):
  """q [B, nt, h, nq, d], k (class token first) [B, nt, h, 1 + n_ca, d],
  k_sa [B, nt, h, n_sa, d]."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, NT, HEADS)
  return (jax.random.normal(keys[0], (*shape, NQ, D)),
          jax.random.normal(keys[1], (*shape, 1 + N_CA, D)),
          jax.random.normal(keys[2], (*shape, N_SA, D)))


@pytest.mark.parametrize('window', [3, 5])
def test_each_query_puts_all_its_mass_on_ca_sa_la_and_sa_only_in_its_window(
    window):
  q, k, k_sa = random_sets()
  masses = masses_of(q, k, k_sa, attention='ca+sa+la', window=window,
                     num_summary=1)
  total = masses['ca'] + masses['sa'].sum(-1) + masses['la'].sum(-1)
  np.testing.assert_allclose(total, 1, atol=1e-6)
  sa = np.asarray(masses['sa'])  # [B, nt, h, nq, nt]
  for i in range(NT):
    outside = [j for j in range(NT) if abs(j - i) > window // 2 or j == i]
    assert (sa[:, i, ..., outside] == 0).all()  # exactly
    inside = [j for j in range(NT) if j not in outside]
    assert (sa[:, i, ..., inside] > 0).all()
  maps = attention_maps.frame_map(masses)  # [B, nt, nt]
  np.testing.assert_allclose(maps.sum(-1), 1, atol=1e-6)


def test_under_ca_alone_the_frame_maps_are_diagonal():
  q, k, k_sa = random_sets(1)
  masses = masses_of(q, k, k_sa, attention='ca', window=3, num_summary=1)
  maps = np.asarray(attention_maps.frame_map(masses))[0]
  np.testing.assert_array_equal(maps, np.diag(np.diag(maps)))
  np.testing.assert_allclose(np.diag(maps), 1, atol=1e-6)
  np.testing.assert_allclose(attention_maps.shares(masses), [[1, 0, 0]],
                             atol=1e-6)


def test_sa_mass_goes_to_the_one_informative_neighbour():
  # Frame 2 queries one direction; only frame 3's SA keys share it.
  direction = jnp.zeros(D).at[0].set(1.0)
  q = jnp.zeros((1, NT, 1, 1, D)).at[0, 2, 0, 0].set(40 * direction)
  k = jnp.zeros((1, NT, 1, 1 + N_CA, D))
  k_sa = jnp.zeros((1, NT, 1, N_SA, D)).at[0, 3].set(direction)
  masses = masses_of(q, k, k_sa, attention='ca+sa+la', window=5,
                     num_summary=1)
  sa = np.asarray(masses['sa'][0, 2, 0, 0])  # [nt]
  assert sa.argmax() == 3 and sa[3] > 0.99
  np.testing.assert_array_equal(sa[[0, 1, 2, 4, 5]] < 0.01, True)


# ------------------------------------------------------------- tiny run ---

def write_video(path, num_frames=24, size=48, rate=8):
  """A bright square moving right over grey noise."""
  rng = np.random.default_rng(0)
  frames = rng.integers(100, 156, (num_frames, size, size, 3), dtype=np.uint8)
  for t, frame in enumerate(frames):
    x = 2 + t % (size - 12)
    frame[18:30, x:x + 10] = 250
  video_testlib.encode(path, frames, rate)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  folder = tmp_path_factory.mktemp('explain')
  workdir = str(folder / 'run')
  export_testlib.save_tiny_run(workdir)
  video = str(folder / 'clip.mp4')
  write_video(video)
  return {'workdir': workdir, 'video': video, 'folder': folder,
          'restored': inference.restore(workdir)}


def test_capturing_the_attention_leaves_the_logits_unchanged(run):
  restored = run['restored']
  video = np.random.default_rng(0).integers(0, 256, (2, 8, 32, 32, 3),
                                            np.uint8)  # tiny's clip shape
  plain, _ = restored.classify(video)
  captured, summary = jax.jit(attention_maps.capture_fn(
      restored.parts, restored.config.data))(restored.params, video)
  # The same model, compiled with more outputs: XLA may fuse it otherwise,
  # so equal up to float32 rounding.
  np.testing.assert_allclose(np.asarray(captured), np.asarray(plain),
                             rtol=1e-5, atol=1e-5)
  assert summary['frame_maps'].shape == (3, 2, 4, 4)  # [L, B, nt, nt]
  assert summary['timeline'].shape == (2, 4)


def test_explain_writes_readable_pictures_and_json(run, capsys):
  out = run['folder'] / 'out'
  code = explain.main([f'--workdir={run["workdir"]}', f'--out={out}',
                       '--json', run['video']])
  assert code == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  mass = report['attention_mass']
  assert len(mass) == 3  # one per STA block of the tiny model
  for entry in mass:
    assert abs(entry['ca'] + entry['sa'] + entry['la'] - 1) < 1e-5
  assert len(report['videos'][0]['top5']) == 5
  pngs = sorted(out.glob('*.png'))
  assert {p.name.split('.')[1] for p in pngs} == {
      'frames', 'shares', 'timeline', 'spatial'}
  for png in pngs:
    pixels = np.asarray(Image.open(png).convert('RGB'))
    assert pixels.std() > 10, png  # not blank
  page = (out / 'index.html').read_text()
  assert all(p.name in page for p in pngs)


def test_each_token_frame_is_titled_with_its_time_in_the_video(run, capsys):
  video = str(run['folder'] / 'long.mp4')
  write_video(video, num_frames=48, rate=12)
  code = explain.main([f'--workdir={run["workdir"]}',
                       f'--out={run["folder"] / "times"}', '--json', video])
  assert code == 0
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # Tiny: T = 8 frames in 8 segments of 6, the first clip at fraction 1/4
  # of each: frames 6i + 1; 4 token frames show input frames 0, 2, 4, 6,
  # i.e. video frames 1, 13, 25, 37, at 12 frames per second.
  np.testing.assert_allclose(report['videos'][0]['frame_times_s'],
                             np.array([1, 13, 25, 37]) / 12, rtol=1e-6)


def write_records(path, labels, num_frames=24):
  """One TFRecord file of synthetic clips (32x32), one record per label;
  returns each record's JPEG frames."""
  jpegs = []
  with dmvr.ShardedWriter(str(path), 1) as writer:
    for index, label in enumerate(labels):
      frames = synthetic.render_clip(label, 0, 'val', index, num_frames, 32)
      jpegs.append(dmvr.encode_frames(frames))
      writer.write(0, dmvr.make_example(
          jpegs[-1], label, synthetic.CLASSES[label]).SerializeToString())
  return writer.filenames[0], jpegs


def test_explain_reads_record_k_of_a_shard_as_evaluation_cuts_it(run, capsys):
  shard, jpegs = write_records(run['folder'] / 'val.tfrecord', [0, 4, 7])
  out = run['folder'] / 'records'
  code = explain.main([f'--workdir={run["workdir"]}', f'--out={out}',
                       '--json', f'{shard}:1'])
  assert code == 0
  video = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[
      'videos'][0]
  assert video['label'] == 'rotate_clockwise'
  assert video['frame_times_s'] is None  # a record has no frame rate
  # The tiny config's eval views by hand: 24 frames in 8 segments of 3, two
  # clips at fractions 1/4 and 3/4 of each: frames 3i and 3i + 2; 32x32
  # frames need no resize or crop.
  frames = np.stack([tf.io.decode_jpeg(jpeg).numpy() for jpeg in jpegs[1]])
  indices = np.array([[3 * i + j for i in range(8)] for j in (0, 2)])
  expected = np.asarray(run['restored'].classify(frames[indices])[1]).mean(0)
  classes = run['restored'].classes
  top = np.argsort(-expected, kind='stable')[:5]
  assert [name for name, _ in video['top5']] == [classes[i] for i in top]
  np.testing.assert_allclose([p for _, p in video['top5']], expected[top],
                             rtol=1e-5, atol=1e-6)
  assert sorted(p.name for p in out.glob('*.png'))[0].startswith(
      '00_val.tfrecord-00000-of-00001_1.')


def test_a_record_past_the_end_or_not_a_record_is_a_user_error(run, capsys):
  shard, _ = write_records(run['folder'] / 'short.tfrecord', [0])
  text = run['folder'] / 'notes.txt'
  text.write_text('not a TFRecord file\n' * 3)
  for argument, message in ((f'{shard}:1', 'holds no record 1 .* it has 1'),
                            (f'{text}:0', 'notes.txt: not a TFRecord file')):
    code = explain.main([f'--workdir={run["workdir"]}',
                         f'--out={run["folder"] / "none"}', argument])
    assert code != 0
    assert re.search(message, capsys.readouterr().err)


# ------------------------------------------------------------ confusion ---

def test_confusion_matrix_of_hand_made_predictions():
  labels = [0, 0, 1, 2, 2, 2]
  predicted = [0, 1, 1, 2, 0, 0]
  predictions = [{'label': l, 'top5': [p, 3]} for l, p in zip(labels,
                                                              predicted)]
  matrix = confusion.gathered(predictions, 4)
  expected = np.zeros((4, 4), int)
  for l, p in zip(labels, predicted):
    expected[l, p] += 1
  np.testing.assert_array_equal(matrix, expected)
  assert matrix.sum() == len(labels)
  assert confusion.most_confused(matrix) == [(2, 0, 2), (0, 1, 1)]
