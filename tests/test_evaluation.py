"""Multi-view evaluation: a hand-worked case, padding, uneven batches against
a numpy reference, time-reversed batches, and the report files."""

import json
import os

import numpy as np
import pytest

from stat_jax.evaluation import (ViewAccumulator, format_summary,
                                 time_reversed, write_report)

# 3 videos x 2 views, 6 classes. Averaging the views changes the top-1 of
# videos 10 and 11 compared with view 0 alone.
HAND_VIEWS = {  # video id -> (label, view 0 probs, view 1 probs)
    10: (2, [0.05, 0.05, 0.40, 0.45, 0.03, 0.02],   # view 0 alone: 3, wrong
         [0.05, 0.05, 0.60, 0.10, 0.10, 0.10]),     # mean: 2 (0.5), right
    11: (0, [0.50, 0.40, 0.02, 0.02, 0.03, 0.03],   # view 0 alone: 0, right
         [0.10, 0.70, 0.05, 0.05, 0.05, 0.05]),     # mean: 1 (0.55), wrong
    12: (5, [0.30, 0.20, 0.20, 0.15, 0.10, 0.05],   # 5 is last in both views
         [0.20, 0.30, 0.20, 0.15, 0.10, 0.05]),
}
NAMES = ['abseiling', 'bowling', 'cooking', 'dancing', 'eating', 'fencing']
PAD_PROBS = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def row(video_id, view):
  label, *views = HAND_VIEWS[video_id]
  return views[view], video_id, label, True


def batch(rows):
  """Rows of (probs, video_id, label, mask); None is a padding row."""
  rows = [(PAD_PROBS, -1, -1, False) if r is None else r for r in rows]
  probs, video_id, label, mask = zip(*rows)
  return (np.array(probs, np.float32), np.array(video_id, np.int32),
          np.array(label, np.int32), np.array(mask))


def hand_accumulator(views=(0, 1)):
  """The hand case in two shuffled batches of 4 rows with padding."""
  rows = [row(v, view) for view in views for v in (12, 10, 11)]
  rows = rows[:3] + [None] + rows[3:] + [None] * (8 - len(rows) - 1)
  accumulator = ViewAccumulator(6)
  accumulator.add(*batch(rows[:4]))
  accumulator.add(*batch(rows[4:]))
  return accumulator


def test_hand_worked_view_average():
  result = hand_accumulator().result()
  assert result['top1'] == pytest.approx(1 / 3)  # only video 10
  assert result['top5'] == pytest.approx(2 / 3)  # video 12 misses
  assert result['per_class'] == {0: 0.0, 2: 1.0, 5: 0.0}
  assert result['per_class_videos'] == {0: 1, 2: 1, 5: 1}
  assert (result['num_videos'], result['num_views']) == (3, 6)
  by_id = {p['video_id']: p for p in result['predictions']}
  assert [p['video_id'] for p in result['predictions']] == [10, 11, 12]
  assert by_id[10]['top5'] == [2, 3, 4, 5, 0]  # 0.05 tie: lower index first
  np.testing.assert_allclose(by_id[10]['top5_probs'],
                             [0.5, 0.275, 0.065, 0.06, 0.05], rtol=1e-6)
  assert by_id[11]['top5'] == [1, 0, 4, 5, 2]
  assert by_id[12]['top5'] == [0, 1, 2, 3, 4]
  assert (by_id[12]['label'], by_id[12]['views']) == (5, 2)


def test_single_view_gives_other_answers():
  result = hand_accumulator(views=(0,)).result()
  assert [p['top5'][0] for p in result['predictions']] == [3, 0, 0]
  assert result['per_class'] == {0: 1.0, 2: 0.0, 5: 0.0}
  assert result['top5'] == pytest.approx(2 / 3)
  assert result['num_views'] == 3


def test_padding_rows_are_ignored_whatever_they_hold():
  reference = hand_accumulator().result()
  accumulator = hand_accumulator()
  garbage = batch([None] * 3)
  accumulator.add(np.full((3, 6), -7.0), *garbage[1:])  # even logits
  accumulator.add(np.ones((3, 6)), [10, 11, 12], [4, 4, 4], [False] * 3)
  assert accumulator.result() == reference


def softmax(logits):
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def random_views(num_videos, num_classes, max_views, seed):
  """(probs [n, K], video_id [n], label [n]) with 1..max_views views per
  video, rows shuffled."""
  rng = np.random.default_rng(seed)
  views = rng.integers(1, max_views + 1, num_videos)
  video_id = np.repeat(np.arange(100, 100 + num_videos), views)
  label = np.repeat(rng.integers(0, num_classes, num_videos), views)
  probs = softmax(rng.normal(size=(video_id.size, num_classes)) * 3)
  order = rng.permutation(video_id.size)
  return probs[order], video_id[order], label[order]


def padded_batches(probs, video_id, label, size):
  """Batches of `size` rows, the last padded with mask False rows."""
  pad = -len(video_id) % size
  mask = np.r_[np.ones(len(video_id), bool), np.zeros(pad, bool)]
  probs = np.r_[probs, np.zeros((pad, probs.shape[1]))]
  video_id, label = np.r_[video_id, [-1] * pad], np.r_[label, [-1] * pad]
  for start in range(0, len(mask), size):
    part = slice(start, start + size)
    yield probs[part], video_id[part], label[part], mask[part]


def reference_metrics(probs, video_id, label, k):
  """Plain loops: mean softmax per video, then top-1 / top-k / per class."""
  top1, topk, per_class = [], [], {}
  for vid in np.unique(video_id):
    mean = probs[video_id == vid].mean(axis=0)
    truth = label[video_id == vid][0]
    ranked = sorted(range(len(mean)), key=lambda c: (-mean[c], c))
    top1.append(ranked[0] == truth)
    topk.append(truth in ranked[:k])
    per_class.setdefault(int(truth), []).append(ranked[0] == truth)
  return (np.mean(top1), np.mean(topk),
          {c: float(np.mean(hits)) for c, hits in per_class.items()})


@pytest.mark.parametrize('num_videos,num_classes,max_views,batch_size',
                         [(7, 10, 3, 4), (13, 8, 5, 6), (5, 3, 2, 4)])
def test_uneven_views_and_batches_match_reference(num_videos, num_classes,
                                                  max_views, batch_size):
  probs, video_id, label = random_views(num_videos, num_classes, max_views,
                                        seed=num_videos)
  accumulator = ViewAccumulator(num_classes)
  for part in padded_batches(probs, video_id, label, batch_size):
    accumulator.add(*part)
  result = accumulator.result()
  k = min(5, num_classes)
  top1, topk, per_class = reference_metrics(probs, video_id, label, k)
  assert result['top1'] == pytest.approx(top1)
  assert result['top5'] == pytest.approx(topk)
  assert result['per_class'] == pytest.approx(per_class)
  assert result['num_videos'] == num_videos
  assert result['num_views'] == len(video_id)
  for p in result['predictions']:
    views = video_id == p['video_id']
    mean = probs[views].mean(axis=0)
    assert len(p['top5']) == k and p['views'] == views.sum()
    np.testing.assert_allclose(p['top5_probs'], mean[p['top5']], rtol=1e-12)
  if num_classes <= 5:
    assert result['top5'] == 1.0  # top-K of K classes always hits


def test_conflicting_labels_raise():
  accumulator = hand_accumulator()
  with pytest.raises(ValueError, match='video 10 has labels 2 and 3'):
    accumulator.add(*batch([(PAD_PROBS, 10, 3, True)]))
  with pytest.raises(ValueError, match='video 7 has labels'):
    ViewAccumulator(6).add(*batch([(PAD_PROBS, 7, 1, True),
                                   (PAD_PROBS, 7, 2, True)]))


def test_time_reversed_batch_flips_frames_and_maps_real_labels():
  video = np.arange(3 * 3 * 4, dtype=np.float32).reshape(3, 3, 4)  # [b, T, .]
  batch = {'video': video, 'label': np.array([4, 0, -1], np.int32),
           'mask': np.array([True, True, False])}
  reversed_classes = (2, 1, 0, 4, 3)  # 0 <-> 2, 3 <-> 4, 1 reads both ways
  reversed_batch = time_reversed(batch, reversed_classes)
  np.testing.assert_array_equal(reversed_batch['video'][0, 0], video[0, 2])
  np.testing.assert_array_equal(reversed_batch['video'][2, 2], video[2, 0])
  assert reversed_batch['label'].tolist() == [3, 2, -1]
  assert reversed_batch['label'].dtype == np.int32
  assert batch['label'].tolist() == [4, 0, -1]  # the input is left alone


def test_bad_inputs_raise():
  accumulator = ViewAccumulator(6)
  with pytest.raises(ValueError, match='not logits'):
    accumulator.add(np.full((1, 6), -1.0), [0], [0], [True])
  with pytest.raises(ValueError, match='label 6 not in'):
    accumulator.add(np.full((1, 6), 1 / 6), [0], [6], [True])
  with pytest.raises(ValueError, match=r'probs \(1, 5\)'):
    accumulator.add(np.full((1, 5), 0.2), [0], [0], [True])
  with pytest.raises(ValueError, match='no videos'):
    ViewAccumulator(6).result()


def test_report_round_trips_through_json(tmp_path):
  result = hand_accumulator().result()
  path = str(tmp_path / 'eval' / 'report.json')
  predictions_path = write_report(result, path, class_names=NAMES)
  assert sorted(os.listdir(tmp_path / 'eval')) == [
      'report.json', 'report.predictions.jsonl']  # no temporary files left
  with open(path) as f:
    report = json.load(f)
  for key in ('top1', 'top5', 'num_videos', 'num_views'):
    assert report[key] == result[key]
  assert report['predictions'] == 'report.predictions.jsonl'
  assert report['per_class'] == [
      {'class': 0, 'top1': 0.0, 'videos': 1, 'name': 'abseiling'},
      {'class': 2, 'top1': 1.0, 'videos': 1, 'name': 'cooking'},
      {'class': 5, 'top1': 0.0, 'videos': 1, 'name': 'fencing'}]
  with open(predictions_path) as f:
    lines = [json.loads(line) for line in f]
  assert [{k: v for k, v in p.items() if 'name' not in k} for p in lines] == (
      result['predictions'])
  assert lines[0]['label_name'] == 'cooking'
  assert lines[0]['top5_names'][:2] == ['cooking', 'dancing']


def test_report_overwrites_keeps_extra_keys_and_works_without_names(tmp_path):
  path = str(tmp_path / 'report.json')
  write_report(hand_accumulator().result(), path, class_names=NAMES)
  single_view = hand_accumulator(views=(0,)).result()
  single_view['checkpoint_step'] = 1200  # extra keys of a caller go through
  write_report(single_view, path)
  with open(path) as f:
    report = json.load(f)
  assert report['num_views'] == 3 and 'name' not in report['per_class'][0]
  assert report['checkpoint_step'] == 1200
  assert len(os.listdir(tmp_path)) == 2


def test_summary_names_the_worst_classes():
  result = hand_accumulator().result()
  assert format_summary(result, NAMES) == (
      'top-1 33.33%  top-5 66.67%  (3 videos, 6 views)\n'
      'worst classes: 0 abseiling 0.0% of 1, 5 fencing 0.0% of 1, '
      '2 cooking 100.0% of 1')
  assert format_summary(result).endswith('0 0.0% of 1, 5 0.0% of 1, '
                                         '2 100.0% of 1')
