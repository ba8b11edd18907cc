"""The label space of a data set: its label map, the class names, a record's
label in the tf.data pipelines, and the check before training that the data's
labels fit model.num_classes.

A record's label is its clip/label/index, else the label map's number of its
clip/label/string. The label map is data.label_map, else label_map.txt beside
the shards (stat_jax.data.convert writes it).
"""


import numpy as np
import tensorflow as tf

from stat_jax.data import dmvr
from stat_jax.data import records
from stat_jax import storage
from stat_jax.checks.errors import UserError

def label_table(data, spec):
  """class name -> label from data.label_map (or label_map.txt beside the
  shards); None when there is no such file (then records need an index)."""
  path = label_map_path(data, spec)
  if not tf.io.gfile.exists(path):
    if data.label_map:
      raise FileNotFoundError(f'data.label_map: no such file {path}')
    return None
  names = dmvr.load_label_map(path)
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(names, tf.range(len(names))), -1)


def label_map_path(data, spec: str) -> str:
  """data.label_map, else label_map.txt beside the shards of `spec`."""
  return data.label_map or storage.join(dmvr.spec_directory(spec),
                                        'label_map.txt')


def label_map_paths(data):
  if data.label_map:
    yield data.label_map
  for spec in (data.eval_spec, data.train_spec):
    if spec:
      try:
        yield storage.join(dmvr.spec_directory(spec), 'label_map.txt')
      except (FileNotFoundError, ValueError):  # shards moved or deleted
        continue


def class_names(config) -> list[str]:
  """From data.label_map, else label_map.txt beside the eval (or train)
  shards, else '0' .. 'N-1'."""
  count = config.model.num_classes
  for path in label_map_paths(config.data):
    if tf.io.gfile.exists(path):
      names = dmvr.load_label_map(path)
      if len(names) != count:
        raise UserError(f'{path}: {len(names)} class names, but '
                         f'model.num_classes = {count}; give the label map of '
                         'this data set, or set model.num_classes')
      return names
  return [str(i) for i in range(count)]


def sample_labels(index: records.RecordIndex, names: list | None, count: int):
  """(labels, unknown label texts, records read) of up to `count` records
  spread over the index; records that do not parse are left to the stream."""
  labels, unknown, read = [], set(), 0
  lookup = {name: i for i, name in enumerate(names or [])}
  for record in np.unique(np.linspace(0, len(index) - 1, count).astype(int)):
    try:
      clip = dmvr.parse_example(index.read(record))
    except ValueError:
      continue
    read += 1
    if clip.label_indices:
      labels.append(clip.label_indices[0])
    elif clip.label_texts and clip.label_texts[0] in lookup:
      labels.append(lookup[clip.label_texts[0]])
    elif clip.label_texts and names is not None:
      unknown.add(clip.label_texts[0])
  return labels, unknown, read


def label(parsed, table, num_classes):
  """int32 label: the first clip/label/index, else the label map entry of the
  first text label; a record with neither (or out of range) fails."""
  candidates = [tf.cast(parsed['label_index'], tf.int32)]
  if table is not None:
    candidates.append(table.lookup(parsed['label_text']))
  label = tf.concat(candidates + [[-1]], 0)[0]
  checks = [tf.debugging.assert_non_negative(label, message='no label'),
            tf.debugging.assert_less(label, num_classes,
                                     message='label >= num_classes')]
  with tf.control_dependencies(checks):
    return tf.identity(label)
