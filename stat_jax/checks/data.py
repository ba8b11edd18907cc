"""Refusals of data specs and the label space, before the first train step.

The second group of checks (stat_jax/checks/__init__.py): the config's own
keys and values are refused before anything is built; these read the data
the config names, once the train index exists, so that a fault of the
eval data or the label space is found now and not after eval_every steps.
"""

import ml_collections
import tensorflow as tf

from stat_jax.checks.errors import UserError
from stat_jax.data import dmvr, labels, records

LABEL_SAMPLE = 64  # records whose labels check_label_space reads per spec


def check_eval_spec(config: ml_collections.ConfigDict) -> None:
  """data.eval_spec (if set) names files that exist, can be read and hold
  records (the index evaluation builds anyway); the first evaluation would
  otherwise fail after eval_every steps."""
  spec = config.data.eval_spec
  if not spec:
    return
  try:
    records.RecordIndex(spec)
  except (UserError, FileNotFoundError) as error:
    raise UserError(f'config.data.eval_spec: {error}') from error
  except (tf.errors.OpError, ValueError) as error:
    raise UserError(f'config.data.eval_spec = {spec!r}: cannot be read: '
                    f'{getattr(error, "message", error)}') from error


def check_label_space(config, train_index: records.RecordIndex | None = None) -> None:
  """Before the first step: the label map (class_names' search order) has
  model.num_classes names, and the labels of a sample of train and eval
  records are in 0 .. num_classes - 1 (the stream would skip the others
  silently, and the end-of-run report fail). UserError naming what differs."""
  data, count = config.data, config.model.num_classes
  labels.class_names(config)  # the label map's length
  for key, index in (('train_spec', train_index), ('eval_spec', None)):
    spec = data[key]
    if not spec:
      continue
    index = index or records.RecordIndex(spec)
    path = labels.label_map_path(data, spec)
    names = (dmvr.load_label_map(path) if tf.io.gfile.exists(path) else None)
    found, unknown, read = labels.sample_labels(index, names, LABEL_SAMPLE)
    outside = sorted({label for label in found if not 0 <= label < count})
    if outside:
      bad = sum(not 0 <= label < count for label in found)
      raise UserError(
          f'data.{key} {spec!r}: {bad} of {read} sampled records have labels '
          f'outside 0..{count - 1} (model.num_classes = {count}): '
          f'{", ".join(map(str, outside[:10]))}; set model.num_classes to '
          'the class count of the data set')
    if unknown:
      raise UserError(f'data.{key} {spec!r}: label(s) '
                       f'{", ".join(map(repr, sorted(unknown)[:10]))} of sampled '
                       f'records are not in the label map {path}')
