"""Multi-view evaluation on the host: the softmax averaged over the views
(clips x crops) of each video, then top-1 / top-5 / per-class accuracy and a
JSON report.

Eval batches (stat_jax/data/eval_pipeline.py, EvalIterator) hold one view per row; rows
with mask False are padding. The accumulator keeps per-video sums (softmax
sums, view counts); trainer.evaluate gathers every process's rows into it.
"""

import json

import numpy as np

from stat_jax import storage
from stat_jax.confusion import format_confused

TOP_K = 5  # top-5 accuracy; top-min(5, K) when there are fewer classes
NUM_WORST = 5  # classes listed by format_summary
# Result keys written to TensorBoard as val_<key>.
EVAL_SCALARS = ('top1', 'top5', 'time_reversed_top1')


class ViewAccumulator:
  """Per-video sums of softmax probabilities over views, and view counts."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self._labels: dict[int, int] = {}  # video id -> label
    self._views: dict[int, int] = {}  # video id -> views added
    self._prob_sums: dict[int, np.ndarray] = {}  # video id -> [K] float64

  def add(self, probs, video_id, label, mask) -> None:
    """Adds a batch of views: probs [b, K] (softmax of the logits),
    video_id, label, mask [b]. Rows with mask False are ignored."""
    probs = np.asarray(probs, np.float64)
    mask = np.asarray(mask, bool)
    if probs.shape != (mask.size, self.num_classes):
      raise ValueError(f'probs {probs.shape} != [{mask.size}, '
                       f'{self.num_classes}]')
    if (probs[mask] < 0).any():
      raise ValueError('probs must be softmax probabilities, not logits')
    for vid, lab, view_probs in zip(np.asarray(video_id)[mask].tolist(),
                                    np.asarray(label)[mask].tolist(),
                                    probs[mask]):
      if not 0 <= lab < self.num_classes:
        raise ValueError(f'video {vid}: label {lab} not in '
                         f'[0, {self.num_classes})')
      if self._labels.setdefault(vid, lab) != lab:
        raise ValueError(f'video {vid} has labels {self._labels[vid]} and '
                         f'{lab}')
      self._views[vid] = self._views.get(vid, 0) + 1
      self._prob_sums[vid] = self._prob_sums.get(vid, 0.0) + view_probs

  def _sums(self) -> dict[str, np.ndarray]:
    """The per-video sums, by increasing video id: video_id, label, views
    int64 [n], prob_sum float64 [n, K]."""
    ids = sorted(self._labels)
    return {
        'video_id': np.array(ids, np.int64),
        'label': np.array([self._labels[v] for v in ids], np.int64),
        'views': np.array([self._views[v] for v in ids], np.int64),
        'prob_sum': np.array([self._prob_sums[v] for v in ids],
                             np.float64).reshape(len(ids), self.num_classes),
    }

  def result(self) -> dict:
    """Accuracy of the view-averaged softmax: top1, top5 (fractions),
    per_class {class: top-1 over its videos} and per_class_videos {class:
    videos} for the classes present, num_videos, num_views, and predictions
    (one dict per video). Ties rank the lower class index first."""
    sums = self._sums()
    if not sums['video_id'].size:
      raise ValueError('no videos were added')
    labels = sums['label']
    mean_probs = sums['prob_sum'] / sums['views'][:, None]  # [n, K]
    # [n, min(5, K)], best first; a stable sort ranks ties by class index.
    top = np.argsort(-mean_probs, axis=1, kind='stable')[:, :TOP_K]
    top1_hit = top[:, 0] == labels
    classes, class_videos = np.unique(labels, return_counts=True)
    return {
        'top1': float(top1_hit.mean()),
        'top5': float((top == labels[:, None]).any(axis=1).mean()),
        'per_class': {int(c): float(top1_hit[labels == c].mean())
                      for c in classes},
        'per_class_videos': dict(zip(classes.tolist(), class_videos.tolist())),
        'num_videos': int(labels.size),
        'num_views': int(sums['views'].sum()),
        'predictions': _predictions(sums, top, mean_probs),
    }


def time_reversed(batch: dict, reversed_classes) -> dict:
  """An eval batch played backwards: 'video' [b, T, ...] reversed along T,
  each real row's label c replaced by reversed_classes[c] (the class its
  clip becomes backwards; config.data.reversed_classes); padding rows
  (label -1) keep theirs."""
  labels = batch['label']
  mapped = np.asarray(reversed_classes, labels.dtype)[np.maximum(labels, 0)]
  return dict(batch, video=batch['video'][:, ::-1],
              label=np.where(labels >= 0, mapped, labels))


def _predictions(sums, top, mean_probs) -> list[dict]:
  """One dict per video: video_id, label, views, top5 (class indices, best
  first) and top5_probs (their view-averaged probabilities)."""
  top_probs = np.take_along_axis(mean_probs, top, axis=1)  # [n, k]
  return [{'video_id': vid, 'label': lab, 'views': views, 'top5': classes,
           'top5_probs': probs}
          for vid, lab, views, classes, probs in zip(
              sums['video_id'].tolist(), sums['label'].tolist(),
              sums['views'].tolist(), top.tolist(), top_probs.tolist())]


def _named_prediction(prediction: dict, class_names) -> dict:
  if class_names is None:
    return prediction
  return {**prediction, 'label_name': class_names[prediction['label']],
          'top5_names': [class_names[c] for c in prediction['top5']]}


def write_report(result: dict, path: str, class_names=None) -> str:
  """Writes `path` (JSON: accuracies, counts, per-class accuracy, and any
  other key a caller put in `result`, e.g. the step or the
  confusion_matrix) and, beside it, <path without extension>.predictions.jsonl
  (one line per video) and, with a confusion matrix, .confusion.png. Each file
  appears complete or not at all. Returns the predictions path."""
  predictions_path = storage.strip_extension(path) + '.predictions.jsonl'
  lines = [json.dumps(_named_prediction(p, class_names)) + '\n'
           for p in result['predictions']]
  storage.write_text(predictions_path, ''.join(lines))
  per_class = [{'class': c, 'top1': acc,
                'videos': result['per_class_videos'][c]}
               for c, acc in sorted(result['per_class'].items())]
  if class_names is not None:
    for entry in per_class:
      entry['name'] = class_names[entry['class']]
  report = {key: value for key, value in result.items()
            if key not in ('per_class', 'per_class_videos', 'predictions')}
  report.update(per_class=per_class,
                predictions=storage.basename(predictions_path))
  storage.write_text(path, json.dumps(report, indent=2) + '\n')
  if 'confusion_matrix' in result:  # beside it: <path>.confusion.png
    from stat_jax import plots  # pylint: disable=g-import-not-at-top
    plots.save(plots.confusion_figure(result['confusion_matrix'], class_names),
               storage.strip_extension(path) + '.confusion.png')
  return predictions_path


def format_accuracy(result: dict) -> str:
  """One line: top-1 / top-5 with the counts, and the time-reversal score
  when the result has one (config.data.reversed_classes set)."""
  text = (f'top-1 {100 * result["top1"]:.2f}%  '
          f'top-5 {100 * result["top5"]:.2f}%  '
          f'({result["num_videos"]} videos, {result["num_views"]} views)')
  if 'time_reversed_top1' in result:
    text += (f'  time-reversed clips given the reversed class '
             f'{100 * result["time_reversed_top1"]:.2f}%')
  return text


def format_summary(result: dict, class_names=None) -> str:
  """Two lines: format_accuracy, then the NUM_WORST classes of lowest
  top-1 (ties: lower class index first); a third with the most confused
  class pairs when the result has a confusion matrix."""
  worst = sorted(result['per_class'].items(),
                 key=lambda item: (item[1], item[0]))[:NUM_WORST]
  names = [str(c) if class_names is None else f'{c} {class_names[c]}'
           for c, _ in worst]
  worst_text = ', '.join(
      f'{name} {100 * acc:.1f}% of {result["per_class_videos"][c]}'
      for name, (c, acc) in zip(names, worst))
  text = f'{format_accuracy(result)}\nworst classes: {worst_text}'
  if 'confusion_matrix' in result:
    text += '\n' + format_confused(result['confusion_matrix'], class_names)
  return text
