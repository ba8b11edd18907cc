"""Data faults that must not lose work or hang: unreadable train shards,
label spaces that do not match the model, shards deleted between a stop and
its resume, converter / synthetic output folders, and one-line errors of
the data and deploy tools."""

import json
import os
import signal

import av
import numpy as np
import pytest
import tensorflow as tf

import data_testlib
import training_testlib
from configs import tiny
from stat_jax.checks import data as data_checks
from stat_jax.data import (convert, dmvr, inspect_shards, synthetic,
                           train_pipeline)
from stat_jax import trainer
from stat_jax.checks.errors import UserError
from stat_jax.preemption import watch


@pytest.fixture(scope='module')
def junk(tmp_path_factory):
  """Shards that give no clip: framing fine, payload random ('random'), or
  SequenceExamples whose frames are not JPEGs ('not_jpeg')."""
  folder = tmp_path_factory.mktemp('junk')
  paths = {'random': str(folder / 'random.tfrecord'),
           'not_jpeg': str(folder / 'not_jpeg.tfrecord')}
  rng = np.random.default_rng(0)
  with tf.io.TFRecordWriter(paths['random']) as writer:
    for _ in range(64):
      writer.write(rng.bytes(1000))
  with tf.io.TFRecordWriter(paths['not_jpeg']) as writer:
    for i in range(16):
      writer.write(dmvr.make_example([rng.bytes(200)] * 6, i % 4)
                   .SerializeToString())
  return paths


@pytest.mark.parametrize('kind', ['random', 'not_jpeg'])
def test_a_train_shard_without_clips_stops_naming_it(junk, kind, capfd):
  config = data_testlib.tiny_config(junk[kind])
  with pytest.raises(UserError) as error:
    next(train_pipeline.make_train_iterator(config))
  records = {'random': 64, 'not_jpeg': 16}[kind]
  assert (f'{records} records in a row gave no clip (as many as the index '
          'holds)') in str(error.value)
  assert junk[kind] in str(error.value)
  reason = {'random': 'unreadable or not a clip',
            'not_jpeg': 'frames that do not decode as JPEG'}[kind]
  assert f'{reason}: {records}' in str(error.value)
  logged = capfd.readouterr().err
  assert 'JPEG' not in logged  # libjpeg's per-frame lines: none
  config.data.max_consecutive_skips = 5
  with pytest.raises(UserError, match='5 records in a row .*'
                     'data.max_consecutive_skips = 5'):
    next(train_pipeline.make_train_iterator(config))


def test_sigterm_stops_an_iterator_waiting_for_clips(junk):
  iterator = train_pipeline.make_train_iterator(
      data_testlib.tiny_config(junk['random'], batch=2))
  before, calls = iterator.get_state(), []
  with watch() as preemption:
    def should_stop():  # a real SIGTERM on the third chunk of junk
      calls.append(1)
      if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return preemption.signalled
    iterator.should_stop = should_stop
    with pytest.raises(train_pipeline.Interrupted):
      next(iterator)
  assert preemption.signalled and len(calls) == 3
  assert iterator.get_state() == before  # nothing consumed


def test_skips_are_reported_and_sigterm_while_waiting_saves(
    motion, junk, tmp_path, capsys, monkeypatch):
  """A mixed good / junk spec: skips in the progress line, a warning and
  TensorBoard; a SIGTERM while the iterator waits saves the last step."""
  config = _run_config(motion, total_steps=8)
  config.data.train_spec = f'{motion["train"]},{junk["random"]}'
  fetch, fetches = train_pipeline.TrainIterator._next_chunk, []

  def next_chunk(self):
    fetches.append(1)
    if len(fetches) == 6:
      os.kill(os.getpid(), signal.SIGTERM)
    return fetch(self)

  monkeypatch.setattr(train_pipeline.TrainIterator, '_next_chunk', next_chunk)
  training_testlib.instant_state_and_step(monkeypatch)
  workdir = str(tmp_path)
  result = trainer.train_and_evaluate(config, workdir)
  out = capsys.readouterr().out
  stopped = max(result['losses'])
  assert result['preempted'] and 1 < stopped < 8, out
  assert f'Pre-empted (SIGTERM) after step {stopped}' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped)))
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == list(
        range(1, stopped + 1))
  assert '| skipped ' in out and 'unreadable or not a clip: ' in out
  assert 'warning: ' in out and 'train records read since' in out
  tags = set()
  for events in tf.io.gfile.glob(os.path.join(workdir, 'tensorboard',
                                              'events*')):
    for event in tf.compat.v1.train.summary_iterator(events):
      tags.update(value.tag for value in event.summary.value)
  assert 'train_skipped_records' in tags


def _run_config(motion, **overrides):
  config = tiny.get_config()
  config.data.train_spec, config.data.eval_spec = motion['train'], motion['val']
  config.data.label_map = motion['label_map']
  config.data.eval_batch_size = 4
  config.checkpoint_every, config.eval_every = 3, 1000
  config.update(overrides)
  return config


def test_label_space_mismatches_are_refused_before_training(motion, tmp_path):
  config = _run_config(motion)
  config.model.num_classes, config.data.reversed_classes = 4, ()
  with pytest.raises(UserError, match='label_map.txt: 12 class names, but '
                     'model.num_classes = 4'):
    trainer.train_and_evaluate(config, str(tmp_path / 'four'))
  config = _run_config(motion)
  config.data.label_map = str(tmp_path / 'label_map.txt')
  dmvr.write_label_map(config.data.label_map, synthetic.CLASSES[:10])
  with pytest.raises(UserError, match='10 class names, but '
                     'model.num_classes = 12'):
    trainer.train_and_evaluate(config, str(tmp_path / 'ten'))
  assert not os.path.exists(tmp_path / 'four' / 'checkpoints')
  assert not os.path.exists(tmp_path / 'ten' / 'checkpoints')
  # No label map: the labels of sampled records are checked.
  (tmp_path / 'level').mkdir()
  spec = data_testlib.write_level_shards(str(tmp_path / 'level'), 'l',
                                         [6] * 12, 2)
  config = data_testlib.tiny_config(spec, eval_spec=spec)
  data_checks.check_label_space(config)
  config.model.num_classes = 4
  with pytest.raises(UserError, match=r"train_spec .*: 8 of 12 sampled "
                     r"records have labels outside 0..3 \(model.num_classes "
                     r"= 4\): 4, 5, 6"):
    data_checks.check_label_space(config)


def test_a_shard_deleted_mid_run_stops_it_naming_the_shard(tmp_path):
  spec = data_testlib.write_level_shards(str(tmp_path), 'g', [6] * 9, 3)
  glob = spec.replace('@3', '-*')
  config = data_testlib.tiny_config(glob, batch=2)
  iterator = train_pipeline.make_train_iterator(config)
  next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  gone = dmvr.resolve_spec(spec)[2]
  os.remove(gone)  # the iterator's readers are running
  with pytest.raises(UserError) as error:
    for _ in range(100):  # batches read ahead before the removal come first
      next(iterator)
  assert str(error.value).startswith(f'train data: shard {gone} is gone')
  assert '\n' not in str(error.value)
  # The resume on the glob that lost the shard.
  resumed = train_pipeline.make_train_iterator(config)
  with pytest.raises(UserError, match="now gives 6 records in 2 shard.*"
                     "reading 9 records in 3 shard.*allow_data_change"):
    resumed.set_state([state])
  resumed.set_state([state], allow_data_change=True)
  assert next(resumed)['label'].shape == (2,)


# ----------------------------------------------------- converter, synthetic ---

def _video(path):
  with av.open(path, 'w') as container:
    stream = container.add_stream('mpeg4', rate=4)
    stream.width, stream.height, stream.pix_fmt = 16, 16, 'yuv420p'
    for t in range(2):
      frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 60 * t, np.uint8),
                                         format='rgb24')
      container.mux(stream.encode(frame))
    container.mux(stream.encode())


def _labels(spec):
  return {os.path.basename(clip.filename): clip.label_indices[0]
          for f in dmvr.resolve_spec(spec) for r in dmvr.read_records(f)
          for clip in [dmvr.parse_example(r)]}


def test_converter_keeps_one_label_space_in_out(tmp_path, capsys):
  for animal in ('cat', 'dog', 'eel', 'fox'):
    _video(str(tmp_path / f'{animal}.mp4'))
  out = tmp_path / 'out'

  def run(name, animals, *extra):
    (tmp_path / f'{name}.csv').write_text(
        ''.join(f'{a}.mp4,{a}\n' for a in animals))
    return convert.main(['--videos', str(tmp_path), '--csv',
                         str(tmp_path / f'{name}.csv'), '--out', str(out),
                         '--name', name, '--num_shards', '1', '--short_side',
                         '16', '--workers', '1', *extra])

  assert run('train', ['cat', 'dog', 'eel']) == 0
  assert run('val', ['cat', 'eel']) == 0
  assert _labels(f'{out}/val.tfrecord@1') == {'cat.mp4': 0, 'eel.mp4': 2}
  assert dmvr.load_label_map(str(out / 'label_map.txt')) == ['cat', 'dog',
                                                             'eel']
  capsys.readouterr()
  assert run('test', ['cat', 'fox']) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and "'fox' are not in" in err
  assert run('../escape', ['cat']) == 1
  assert "--name '../escape': give a plain name" in capsys.readouterr().err
  linked = tmp_path / 'linked'
  linked.mkdir()
  (linked / 'label_map.txt').symlink_to(tmp_path / 'elsewhere.txt')
  with pytest.raises(UserError, match='is a symbolic link'):
    convert.convert([], ['cat'], str(linked), 'train')
  assert not (tmp_path / 'elsewhere.txt').exists()


def test_synthetic_refuses_another_set_in_out(tmp_path, capsys):
  out = str(tmp_path / 'set')
  synthetic.generate(out, 2, 1, num_frames=2, size=8)
  synthetic.generate(out, 2, 1, num_frames=2, size=8)  # the same: fine
  assert synthetic.main(['--out', out, '--train', '3', '--val', '1',
                         '--frames', '2', '--size', '8']) == 1
  assert 'holds a synthetic set made with' in capsys.readouterr().err
  other = tmp_path / 'other'
  other.mkdir()
  (other / 'label_map.txt').write_text('a\n')
  with pytest.raises(UserError, match='already holds a data set'):
    synthetic.generate(str(other), 2, 1, num_frames=2, size=8)


# ------------------------------------------------------- one-line errors ---

def test_inspect_a_file_that_is_not_a_tfrecord(tmp_path, capsys):
  path = tmp_path / 'notes.txt'
  path.write_text('this is not a TFRecord file at all\n' * 3)
  assert inspect_shards.main([str(path)]) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'not a TFRecord file' in err


def test_predict_names_a_truncated_export_file(tmp_path):
  from stat_jax.deploy import predict  # pylint: disable=g-import-not-at-top
  (tmp_path / 'manifest.json').write_text(json.dumps({
      'config': tiny.get_config().to_dict(), 'classes': ['a'],
      'formats': {'stablehlo': {'path': 'model.stablehlo'},
                  'onnx': {'path': 'model.onnx'}}})[:-40])
  with pytest.raises(UserError, match='manifest.json: not a whole export'):
    predict.from_export(str(tmp_path))
  (tmp_path / 'manifest.json').write_text(json.dumps({
      'config': tiny.get_config().to_dict(), 'classes': ['a'],
      'formats': {'stablehlo': {'path': 'model.stablehlo'},
                  'onnx': {'path': 'model.onnx'}}}))
  for name, fmt in (('model.stablehlo', 'stablehlo'), ('model.onnx', 'onnx')):
    (tmp_path / name).write_bytes(b'\x08\x07truncated')
    with pytest.raises(UserError, match=f'{name}: cannot load the {fmt}'):
      predict.from_export(str(tmp_path), fmt)


def test_export_to_a_dangling_symlink_is_refused_first(tmp_path, capsys):
  from stat_jax.deploy import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'exports'
  out.symlink_to(tmp_path / 'gone')
  assert export.main(['--workdir', str(tmp_path / 'no_run'),
                      '--out', str(out)]) == 1
  assert 'is a symbolic link to a missing' in capsys.readouterr().err
