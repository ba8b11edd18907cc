"""Train / eval pipelines: sampling through tf.data, the train order and
its two readers (the stream, the Python path that fills bad slots), exact
resume, skipped records, exact-once eval across simulated processes."""

import gc
import json
import weakref

import numpy as np
import pytest
import tensorflow as tf

import data_testlib
from stat_jax.data import dmvr
from stat_jax.data import eval_pipeline
from stat_jax.data import sampling
from stat_jax.data import train_order
from stat_jax.data import train_pipeline

TRAIN_LENGTHS = [6 + (5 * i) % 25 for i in range(20)]  # 6..30 frames
EVAL_LENGTHS = [5 + (7 * i) % 20 for i in range(13)]
BAD = {3: 'proto', 7: 'jpeg'}


@pytest.fixture(scope='module')
def data_specs(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('data_pipeline'))
  static = f'{folder}/static.tfrecord'
  with dmvr.ShardedWriter(static, 2) as writer:
    for i in range(4):  # identical random frames within each clip
      image = np.random.default_rng(i).integers(0, 255, (24, 32, 3), np.uint8)
      frames = np.repeat(image[None], 10, 0)
      writer.write(i % 2, dmvr.make_example(
          dmvr.encode_frames(frames), i).SerializeToString())
  return {
      'train': data_testlib.write_level_shards(folder, 'train', TRAIN_LENGTHS),
      'eval': data_testlib.write_level_shards(folder, 'val', EVAL_LENGTHS),
      'bad': data_testlib.write_level_shards(folder, 'bad', [12] * 12, 2, BAD),
      'static': writer.spec,
  }


def _augmented(config):
  """Random crops on the host (the rest of the recipe runs on the device)."""
  config.data.area_range, config.data.aspect_range = (0.3, 1.0), (3 / 4, 4 / 3)
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['video'], b['video'])
    np.testing.assert_array_equal(a['key'], b['key'])


def test_train_batch_samples_one_frame_per_segment(data_specs):
  config = data_testlib.tiny_config(data_specs['train'], frames=4, batch=5)
  batch = next(train_pipeline.make_train_iterator(config))
  assert batch['video'].shape == (5, 4, 16, 16, 3)
  assert batch['video'].dtype == np.uint8 and batch['label'].dtype == np.int32
  assert batch['key'].shape == (5, 2) and batch['key'].dtype == np.uint32
  frames = data_testlib.frame_numbers(batch['video'])  # [5, 4]
  for label, clip_frames in zip(batch['label'], frames):
    length = TRAIN_LENGTHS[label]
    bounds = [i * length // 4 for i in range(5)]
    for i, frame in enumerate(clip_frames):
      assert bounds[i] <= frame < bounds[i + 1], (length, clip_frames)


def test_train_dense_sampling_strides_and_loops(data_specs):
  config = data_testlib.tiny_config(data_specs['train'], frames=4, batch=10)
  config.data.sampling, config.data.frame_stride = 'dense', 3
  batch = next(train_pipeline.make_train_iterator(config))
  frames = data_testlib.frame_numbers(batch['video'])
  for label, clip_frames in zip(batch['label'], frames):
    length = TRAIN_LENGTHS[label]
    assert clip_frames[0] <= max(length - 10, 0)
    expected = (clip_frames[0] + 3 * np.arange(4)) % length
    assert clip_frames.tolist() == expected.tolist()


def test_each_epoch_is_a_new_permutation(data_specs):
  config = data_testlib.tiny_config(data_specs['train'], batch=4)
  batches = _take(train_pipeline.make_train_iterator(config), 10)
  labels = np.concatenate([b['label'] for b in batches])
  assert sorted(labels[:20]) == list(range(20))
  assert sorted(labels[20:]) == list(range(20))
  assert labels[:20].tolist() != labels[20:].tolist()


def _global_batches(config, process_count, count, state=None):
  """`count` global batches: the batches of process_count iterators (set to
  `state`, a list of saved data states, if given) side by side in process
  order, as sharding.global_batch lays them out; and the iterators."""
  iterators = [train_pipeline.make_train_iterator(config, process_index=k,
                                            process_count=process_count)
               for k in range(process_count)]
  for iterator in iterators:
    if state is not None:
      iterator.set_state(state)
  batches = []
  for _ in range(count):
    parts = [next(iterator) for iterator in iterators]
    batches.append({key: np.concatenate([part[key] for part in parts])
                    for key in parts[0]})
  return batches, iterators


def test_global_batches_do_not_depend_on_the_process_count(data_specs):
  """Nor do the clips that fill the slots of bad records."""
  config = _augmented(data_testlib.tiny_config(data_specs['bad'], batch=4))
  one, _ = _global_batches(config, 1, 4)  # across the end of epoch 0
  assert len({tuple(b['label']) for b in one}) == 4
  for process_count in (2, 4):
    _assert_batches_equal(one, _global_batches(config, process_count, 4)[0])


def test_a_state_saved_by_two_processes_resumes_on_one_and_on_four(
    data_specs):
  config = _augmented(data_testlib.tiny_config(data_specs['bad'], batch=4))
  straight, _ = _global_batches(config, 1, 6)
  _, saved_by = _global_batches(config, 2, 3)
  states = json.loads(json.dumps([it.get_state() for it in saved_by]))
  assert {(s['epoch'], s['position']) for s in states} == {(1, 0)}
  for process_count in (1, 4):
    resumed, iterators = _global_batches(config, process_count, 3, states)
    _assert_batches_equal(straight[3:], resumed)
    # The saved counters' sum went to process 0: the run's total carries on.
    skipped = [it.num_skipped for it in iterators]
    assert sum(skipped) == sum(clip in BAD for clip in _bad_spec_order(2)[:24])
    assert skipped[0] >= sum(s['num_skipped'] for s in states) == 2


def test_resume_refuses_states_of_the_old_order_or_that_disagree(data_specs):
  config = data_testlib.tiny_config(data_specs['train'])
  iterator = train_pipeline.make_train_iterator(config)
  state = iterator.get_state()
  old = {key: value for key, value in state.items() if key != 'order'}
  with pytest.raises(ValueError, match='written by an older stat-jax, whose '
                     'processes each read their own part'):
    iterator.set_state([dict(old, process_index=0, process_count=1)])
  with pytest.raises(ValueError, match=r'the 2 processes .* disagree on '
                     r"position: \[\{'position': 0\}, \{'position': 4\}\]"):
    iterator.set_state([state, dict(state, position=4)])


def test_same_seed_same_batches(data_specs):
  config = _augmented(data_testlib.tiny_config(data_specs['train']))
  first = _take(train_pipeline.make_train_iterator(config), 3)
  again = _take(train_pipeline.make_train_iterator(config), 3)
  _assert_batches_equal(first, again)
  config.seed = 1
  other = next(train_pipeline.make_train_iterator(config))
  assert not np.array_equal(other['video'], first[0]['video'])
  assert not np.array_equal(other['key'], first[0]['key'])


def test_resume_mid_epoch_replays_exactly(data_specs):
  config = _augmented(data_testlib.tiny_config(data_specs['train']))
  iterator = train_pipeline.make_train_iterator(config)
  _take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))  # small, serialisable
  assert (state['epoch'], state['position']) == (0, 8)
  expected = _take(iterator, 5)  # runs across the end of epoch 0
  resumed = train_pipeline.make_train_iterator(config)
  resumed.set_state([state])
  _assert_batches_equal(expected, _take(resumed, 5))
  assert resumed.get_state() == iterator.get_state()


def test_resume_rejects_other_seed(data_specs):
  config = data_testlib.tiny_config(data_specs['train'])
  state = train_pipeline.make_train_iterator(config).get_state()
  config.seed = 1
  with pytest.raises(ValueError, match='seed: expected 1, got 0'):
    train_pipeline.make_train_iterator(config).set_state([state])


def test_crop_identical_across_frames(data_specs):
  config = _augmented(data_testlib.tiny_config(data_specs['static'], frames=6))
  for batch in _take(train_pipeline.make_train_iterator(config), 3):
    video = batch['video']  # [b, T, H, W, 3]
    np.testing.assert_array_equal(video, video[:, :1].repeat(6, 1))
    assert video.std(axis=(1, 2, 3, 4)).min() > 5


def test_repeated_augmentation_gives_k_clips_of_each_video(data_specs):
  config = _augmented(data_testlib.tiny_config(data_specs['train'], batch=6))
  config.data.repeated_augment = 3
  iterator = train_pipeline.make_train_iterator(config)
  batch = next(iterator)
  assert batch['video'].shape == (6, 4, 16, 16, 3)
  state = iterator.get_state()
  assert (state['epoch'], state['position']) == (0, 2)  # two videos read
  labels = batch['label'].reshape(2, 3)
  assert (labels == labels[:, :1]).all() and labels[0, 0] != labels[1, 0]
  frames = data_testlib.frame_numbers(batch['video']).reshape(2, 3, 4)
  assert (frames == frames[:, :1]).all()  # the same frames, decoded once
  assert len({key.tobytes() for key in batch['key']}) == 6
  config.data.train_spec = data_specs['static']
  video = next(train_pipeline.make_train_iterator(config))['video'].reshape(2, 3, -1)
  assert all(len({clip.tobytes() for clip in clips}) == 3
             for clips in video)  # three crops of each video


def _bad_spec_order(epochs):
  """The clips of the 'bad' spec's slots by the train order's definition:
  epoch e visits index record index_shuffle(i, (seed 0, e)), i = 0 .. 11,
  in int64; record r (file order) is clip labels[r], as clip i is in shard
  i % 2 (write_level_shards)."""
  int64 = lambda value: tf.constant(value, tf.int64)
  labels = sorted(range(12), key=lambda i: (i % 2, i))
  return [labels[int(tf.random.experimental.index_shuffle(
      int64(i), seed=int64([0, epoch]), max_index=int64(11)))]
          for epoch in range(epochs) for i in range(12)]


def test_the_order_is_the_same_wherever_it_is_asked():
  """A slot's record and seed: from Python ints (the Python path) and from
  int64 tensors inside tf.data (the stream) alike, and the records those of
  the order's definition (_bad_spec_order)."""
  order = train_order.TrainOrder(num_records=12, seed=0)
  slots = range(36)  # three epochs
  in_python = [(int(order.record(s)), order.randomness(s).numpy().tolist())
               for s in slots]
  stream = tf.data.Dataset.range(36).map(
      lambda s: (order.record(s), order.randomness(s)))
  assert in_python == [(int(r), seed.tolist())
                       for r, seed in stream.as_numpy_iterator()]
  labels = sorted(range(12), key=lambda i: (i % 2, i))  # record -> clip
  assert [labels[r] for r, _ in in_python] == _bad_spec_order(3)
  assert len({tuple(seed) for _, seed in in_python}) == 36
  assert [order.epoch_position(s) for s in (0, 11, 12, 30)] == [
      (0, 0), (0, 11), (1, 0), (2, 6)]
  assert all(order.slot(*order.epoch_position(s)) == s for s in slots)


def test_the_python_path_gives_a_slot_the_clips_the_stream_gives(data_specs):
  """The path that fills a bad slot, asked for a good slot's own record,
  gives the very clips the tf.data stream gives that slot."""
  config = _augmented(data_testlib.tiny_config(data_specs['train'], batch=4))
  config.data.repeated_augment = 2
  iterator = train_pipeline.make_train_iterator(config)
  batches = _take(iterator, 2)  # slots 0, 1 and 2, 3
  for slot in range(4):
    clips = iterator._decode(iterator._read(slot, slot))
    assert int(clips['reason']) == 0
    streamed = batches[slot // 2]
    rows = slice(2 * (slot % 2), 2 * (slot % 2) + 2)
    np.testing.assert_array_equal(clips['video'].numpy(),
                                  streamed['video'][rows])
    np.testing.assert_array_equal(clips['key'].numpy(), streamed['key'][rows])
    assert (streamed['label'][rows] == int(clips['label'])).all()


def test_a_bad_record_gives_its_slot_the_next_good_record(data_specs):
  config = data_testlib.tiny_config(data_specs['bad'], batch=10)
  iterator = train_pipeline.make_train_iterator(config)
  labels = np.concatenate([next(iterator)['label'] for _ in range(3)])
  order = _bad_spec_order(3)
  expected = [next(r for r in order[s:] if r not in BAD) for s in range(30)]
  assert labels.tolist() == expected
  assert iterator.skipped == {1: order[:30].count(3), 2: 0,
                              3: order[:30].count(7)}  # proto, jpeg
  assert iterator.num_skipped == sum(iterator.skipped.values()) >= 4


def test_a_bad_slot_gets_the_next_record_with_its_own_draws(data_specs):
  """The clip that fills a bad slot s is the next slot's record, drawn with
  s's seed (not the one that slot s + 1 draws it with), and is what the
  Python path gives when asked for (s, s + 1)."""
  config = _augmented(data_testlib.tiny_config(data_specs['bad'], batch=4))
  iterator = train_pipeline.make_train_iterator(config)
  batches = _take(iterator, 3)  # epoch 0
  video, key, labels = (np.concatenate([b[name] for b in batches])
                        for name in ('video', 'key', 'label'))
  order = _bad_spec_order(1)
  bad = [s for s in range(11) if order[s] in BAD and order[s + 1] not in BAD]
  assert len(bad) == 2
  for slot in bad:
    assert labels[slot] == labels[slot + 1] == order[slot + 1]
    assert not np.array_equal(key[slot], key[slot + 1])
    assert not np.array_equal(video[slot], video[slot + 1])
    clips = iterator._decode(iterator._read(slot, slot + 1))
    np.testing.assert_array_equal(clips['video'].numpy()[0], video[slot])
    np.testing.assert_array_equal(clips['key'].numpy()[0], key[slot])


def _eval_config(spec):
  config = data_testlib.tiny_config(eval_spec=spec, frames=4)
  config.data.num_clips, config.data.num_crops = 2, 3
  return config


@pytest.mark.parametrize('process_count, devices, rows', [
    (1, 1, 12), (2, 1, 6), (3, 1, 4),
    (5, 2, 4),  # 12 views over 5 processes of 2 devices: 3 -> 4 rows each
    (4, 4, 4)])  # 3 views a process, padded to one row per device
def test_eval_covers_every_view_exactly_once(data_specs, process_count,
                                             devices, rows):
  config = _eval_config(data_specs['eval'])
  views, batch_counts = [], []
  for k in range(process_count):
    iterator = eval_pipeline.make_eval_iterator(
        config, process_index=k, process_count=process_count,
        devices_per_process=devices)
    batches = list(iterator)
    batch_counts.append(len(batches))
    assert iterator.num_skipped == 0
    for batch in batches:
      assert batch['video'].shape == (rows, 4, 16, 16, 3)
      keep = batch['mask']
      assert np.all(batch['label'][~keep] == -1)
      views.extend(zip(batch['video_id'][keep], batch['view'][keep],
                       batch['label'][keep]))
  assert len(set(batch_counts)) == 1  # all processes step together
  pairs = [(int(v), int(w)) for v, w, _ in views]
  assert sorted(pairs) == [(v, w) for v in range(13) for w in range(6)]
  label_of = {}
  for video_id, _, label in views:
    assert label_of.setdefault(int(video_id), int(label)) == label
  assert sorted(label_of.values()) == list(range(13))


def test_eval_views_take_uniform_clips(data_specs):
  config = _eval_config(data_specs['eval'])
  batch = next(eval_pipeline.make_eval_iterator(config))
  frames = data_testlib.frame_numbers(batch['video'])
  for label, view, clip_frames in zip(batch['label'], batch['view'], frames):
    length, clip = EVAL_LENGTHS[label], view // 3
    starts = [i * length // 4 for i in range(5)]
    expected = [s + int((clip + 0.5) / 2 * max(e - s, 1))
                for s, e in zip(starts, starts[1:])]
    assert clip_frames.tolist() == expected


def test_eval_skips_and_counts_corrupt_records(data_specs):
  config = _eval_config(data_specs['bad'])
  iterator = eval_pipeline.make_eval_iterator(config)
  batches = list(iterator)
  assert iterator.num_skipped == 2
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert sorted(set(labels)) == [i for i in range(12) if i not in BAD]
  assert len(labels) == 10 * 6


def _out_of_memory(jpegs):
  """checked_jpegs that fails as a bug or a full memory would: not bad data."""
  def fail(_):
    raise MemoryError('decode ran out of memory')
  return tf.py_function(fail, [jpegs], jpegs.dtype)


def test_an_error_that_is_not_bad_data_stops_the_pipelines(data_specs,
                                                           monkeypatch):
  monkeypatch.setattr(sampling, 'checked_jpegs', _out_of_memory)
  train = train_pipeline.make_train_iterator(
      data_testlib.tiny_config(data_specs['train']))
  with pytest.raises(RuntimeError, match=r'train record \d+ of .*: its decode '
                     'failed with ResourceExhaustedError, not a data error') as raised:
    next(train)
  assert 'decode ran out of memory' in str(raised.value.__cause__)
  assert train.num_skipped == 0
  evaluation = eval_pipeline.make_eval_iterator(_eval_config(data_specs['eval']))
  with pytest.raises(RuntimeError, match='eval record 0: its decode failed '
                     'with ResourceExhaustedError, not a data error'):
    list(evaluation)


def test_config_errors_name_the_values(data_specs):
  config = data_testlib.tiny_config(data_specs['train'], batch=5)
  with pytest.raises(ValueError, match='batch_size 5 .* process_count 2'):
    train_pipeline.make_train_iterator(config, process_count=2)
  config = _eval_config(data_specs['eval'])
  config.data.eval_short_side = 8
  with pytest.raises(ValueError, match='eval_short_side 8 < data.crop_size 16'):
    eval_pipeline.make_eval_iterator(config)


@pytest.fixture
def no_garbage_collection():
  gc.collect()
  gc.disable()
  yield
  gc.enable()


@pytest.mark.usefixtures('no_garbage_collection')
def test_a_dropped_iterator_stops_its_threads_at_once(data_specs):
  """Dropping the last reference frees a train or eval iterator and its
  tf.data iterator by reference counting. Left to the garbage collector (a
  reference cycle through a function given to tf.data), the collection
  that frees it can stall for seconds while the threads stop."""
  train = data_testlib.tiny_config(data_specs['train'], batch=2)
  evaluation = _eval_config(data_specs['eval'])
  for make in (lambda: train_pipeline.make_train_iterator(train),
               lambda: eval_pipeline.make_eval_iterator(evaluation)):
    iterator = make()
    next(iterator)
    freed = [weakref.ref(iterator), weakref.ref(iterator._batches)]
    del iterator
    assert [ref() for ref in freed] == [None, None]
