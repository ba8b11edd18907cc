"""The global train order: which record and which randomness each slot of
the train stream gets (docs/design.md#record-index-and-exact-resume).

Slot s = e n + i (n records) holds record perm_e(i), where perm_e is
tf.random.experimental.index_shuffle seeded (seed, e): every epoch visits
all n records, in a new order. Its draws (frames, crop windows, device
augmentation key data) come from the stateless seed
fold_in(fold_in((seed, 0), e), i). Both are functions of the slot alone, so
any process that reads a slot, the tf.data stream or the Python path that
fills a slot whose record gave no clip, gets the same record and the same
draws. The functions take a Python int or an int64 tensor (inside tf.data
or eagerly).
"""

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class TrainOrder:
  """The train order of `num_records` records under `seed`."""
  num_records: int
  seed: int

  def epoch_position(self, slot):
    """(e, i) of slot s = e n + i: ints for an int, int64 for a tensor."""
    return slot // self.num_records, slot % self.num_records

  def slot(self, epoch: int, position: int) -> int:
    return epoch * self.num_records + position

  def record(self, slot) -> tf.Tensor:
    """int64: the record number (index order) that slot `slot` holds."""
    epoch, position = self.epoch_position(tf.cast(slot, tf.int64))
    return tf.random.experimental.index_shuffle(
        position, seed=tf.stack([tf.constant(self.seed, tf.int64), epoch]),
        max_index=tf.constant(self.num_records - 1, tf.int64))

  def randomness(self, slot) -> tf.Tensor:
    """int64 [2]: the stateless seed of slot `slot`'s draws."""
    epoch, position = self.epoch_position(tf.cast(slot, tf.int64))
    return tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(
            tf.constant([self.seed, 0], tf.int64), epoch), position)
