"""The confusion matrix of an evaluation: row = true class, column = the
predicted (top-1 of the view-averaged softmax) class, counts of videos.

Each process counts its share of the videos (every process_count-th, by
video id) on device, with a one-hot product; the counts are summed over
processes, so the matrix sums to the videos evaluated.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

NUM_CONFUSED = 5  # pairs listed by format_confused


@functools.partial(jax.jit, static_argnums=2)
def counts(labels, predicted, num_classes: int):
  """int32 [C, C] from labels, predicted int [n] (on device)."""
  true = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)  # [n, C]
  pred = jax.nn.one_hot(predicted, num_classes, dtype=jnp.int32)
  return true.T @ pred


def gathered(predictions: list[dict], num_classes: int) -> np.ndarray:
  """int64 [C, C] over all processes from evaluation's per-video predictions
  (every process holds all of them; each counts its share). A collective."""
  mine = predictions[jax.process_index()::jax.process_count()]
  labels = np.array([p['label'] for p in mine], np.int32)
  predicted = np.array([p['top5'][0] for p in mine], np.int32)
  local = np.asarray(counts(labels, predicted, num_classes), np.int64)
  return multihost_utils.process_allgather(local).reshape(
      -1, num_classes, num_classes).sum(axis=0)


def most_confused(matrix, k: int = NUM_CONFUSED) -> list[tuple[int, int, int]]:
  """The k largest off-diagonal counts as (true, predicted, count), largest
  first (ties: lower true, then predicted class first); zeros left out."""
  matrix = np.asarray(matrix)
  off = [(-int(matrix[t, p]), t, p) for t in range(len(matrix))
         for p in range(len(matrix)) if t != p and matrix[t, p]]
  return [(t, p, -n) for n, t, p in sorted(off)[:k]]


def format_confused(matrix, class_names=None) -> str:
  """'most confused: a -> b 3, ...' (true -> predicted, videos)."""
  name = lambda c: str(c) if class_names is None else f'{c} {class_names[c]}'
  pairs = most_confused(matrix)
  text = ', '.join(f'{name(t)} -> {name(p)} {n}' for t, p, n in pairs)
  return f'most confused (true -> predicted): {text or "none"}'
