"""The synthetic motion dataset: determinism, reversed pairs, visible motion,
shards + label map, and the TFDS builder."""

import importlib
import json
import os

import numpy as np
import pytest

import data_testlib
from stat_jax.data import dmvr
from stat_jax.data import synthetic


def test_classes_come_in_reversed_pairs():
  assert len(synthetic.CLASSES) == 12
  for label in range(12):
    partner = synthetic.reverse_class(label)
    assert partner != label and synthetic.reverse_class(partner) == label
  assert synthetic.CLASSES[synthetic.reverse_class(0)] == 'move_right'
  assert synthetic.CLASSES[synthetic.reverse_class(11)] == 'appear'
  with pytest.raises(ValueError, match='expected 0..11, got 12'):
    synthetic.reverse_class(12)


def test_reversed_class_is_the_clip_played_backwards():
  for label in range(0, 12, 2):
    forward = synthetic.render_clip(label, 3, 'train', 5, 8, 32)
    backward = synthetic.render_clip(label + 1, 3, 'train', 5, 8, 32)
    np.testing.assert_array_equal(forward[::-1], backward)


def test_clips_are_deterministic_per_seed():
  first = synthetic.render_clip(4, 0, 'val', 1, 8, 32)
  assert first.shape == (8, 32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first,
                                synthetic.render_clip(4, 0, 'val', 1, 8, 32))
  assert not np.array_equal(first, synthetic.render_clip(4, 1, 'val', 1, 8, 32))


def _centroid(clip):
  """[T, 2] (x, y) centroid of the pixels that differ from the time median."""
  foreground = np.abs(clip.astype(float) - np.median(clip, 0)).sum(-1) > 60
  ys, xs = np.mgrid[0:clip.shape[1], 0:clip.shape[2]]
  weights = foreground.sum((1, 2)) + 1e-6
  return np.stack([(foreground * xs).sum((1, 2)) / weights,
                   (foreground * ys).sum((1, 2)) / weights], -1)


@pytest.mark.parametrize('label, axis, sign', [
    (0, 0, -1), (1, 0, 1), (2, 1, -1), (3, 1, 1)])
def test_moving_objects_travel_the_named_way(label, axis, sign):
  for index in range(4):
    clip = synthetic.render_clip(label, 0, 'train', index, 16, 64)
    centroid = _centroid(clip)
    assert sign * (centroid[-1, axis] - centroid[0, axis]) > 10


@pytest.mark.parametrize('label', range(12))
def test_every_class_moves_visibly(label):
  clip = synthetic.render_clip(label, 0, 'train', 0, 16, 32).astype(float)
  assert np.abs(clip[-1] - clip[0]).mean() > 2


def test_generate_writes_shards_and_label_map(tmp_path):
  specs = synthetic.generate(str(tmp_path), 30, 12, num_frames=8, size=32)
  assert dmvr.load_label_map(specs['label_map']) == list(synthetic.CLASSES)
  records = [r for f in dmvr.resolve_spec(specs['train'])
             for r in dmvr.read_records(f)]
  assert len(records) == 30
  clips = [dmvr.parse_example(r) for r in records]
  assert sorted(c.label_indices[0] for c in clips) == sorted(
      synthetic.clip_label(i) for i in range(30))
  assert all(len(c.frames) == 8 for c in clips)
  assert all(c.label_texts == [synthetic.CLASSES[c.label_indices[0]]]
             for c in clips)
  val = [r for f in dmvr.resolve_spec(specs['val']) for r in
         dmvr.read_records(f)]
  assert len(val) == 12


def test_command_line(tmp_path, capsys):
  synthetic.main(['--out', str(tmp_path), '--train', '4', '--val', '2',
                  '--frames', '4', '--size', '32', '--seed', '1'])
  assert 'train.tfrecord@1' in capsys.readouterr().out


def test_tfds_builder_loads_offline(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  importlib.import_module('stat_jax.data.synthetic_tfds')  # registers the builder
  train = tfds.load('synthetic_motion/tiny', split='train',
                    data_dir=str(tmp_path))
  examples = list(train.as_numpy_iterator())
  assert len(examples) == 48
  example = examples[0]
  assert example['video'].shape == (8, 32, 32, 3)
  index = int(example['id'].decode().split('/')[1])
  assert example['label'] == synthetic.clip_label(index)
  expected = synthetic.render_clip(example['label'], 0, 'train', index, 8, 32)
  assert np.abs(example['video'].astype(int) - expected).mean() < 4  # JPEG


def test_prepare_generates_once_and_fills_the_specs(tmp_path):
  data = data_testlib.tiny_config().data
  data.synthetic.update(generate=True, dir=str(tmp_path / 'set'),
                        train_clips=6, val_clips=3, frames=4, size=32)
  specs = synthetic.prepare(data)
  assert data.train_spec == specs['train'] == f'{tmp_path}/set/train.tfrecord@1'
  assert len(list(dmvr.read_records(dmvr.resolve_spec(data.eval_spec)[0]))) == 3
  stamp = os.path.getmtime(dmvr.resolve_spec(data.train_spec)[0])
  assert synthetic.prepare(data) == specs  # reused, not rewritten
  assert os.path.getmtime(dmvr.resolve_spec(data.train_spec)[0]) == stamp
  data.synthetic.size = 40
  with pytest.raises(ValueError, match="'size': 32"):
    synthetic.prepare(data)


def test_prepare_refuses_a_set_from_an_older_generator(tmp_path):
  data = data_testlib.tiny_config().data
  data.synthetic.update(generate=True, dir=str(tmp_path / 'set'),
                        train_clips=2, val_clips=1, frames=4, size=32)
  synthetic.prepare(data)
  params_path = tmp_path / 'set' / 'params.json'
  params = json.loads(params_path.read_text())
  params['generator'] = synthetic.GENERATOR_VERSION - 1
  params_path.write_text(json.dumps(params))
  with pytest.raises(ValueError, match="'generator': 1"):
    synthetic.prepare(data)


def test_backgrounds_are_grey():
  """Objects and textures vary; the background has no colour (R = G = B)."""
  clips = [synthetic.render_clip(label, 0, 'train', i, 4, 32)
           for i, label in enumerate(range(0, 12, 2))]
  corners = np.stack([c[:, :3, :3].reshape(-1, 3).mean(0) for c in clips])
  assert np.all(np.ptp(corners, axis=1) < 4), corners
