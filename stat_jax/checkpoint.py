"""Orbax checkpoints of a run: train state, data iterator position, config.

Each checkpoint `<workdir>/checkpoints/<step>/` holds
  state   the train state (params, optimizer state, step) as sharded arrays,
  data    the input iterator position of every process, in process order
          ({'processes': [state of process 0, ...]}, a few integers each;
          see stat_jax/data/train_pipeline.py),
  config  the experiment config as JSON.
The latest `keep` checkpoints are kept, plus the best by validation top-1.
Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed while saving leaves the previous one as latest.

Multi-process: every process calls every method. Each writes the shards of
the arrays it holds; process 0 writes the JSON items and commits. The state
restores onto any mesh (it is resharded to the shardings asked for), and
training resumes on any process count: the data states of all processes
that saved are handed to the data pipeline, which continues its one global
train order from their common position (stat_jax/data/train_pipeline.py).

A checkpoint that cannot be read whole (a truncated or deleted array file,
an empty step folder, a missing `state/_METADATA`) raises CorruptCheckpoint,
one line naming the step and what is wrong, with orbax / tensorstore logging
silenced for the attempt. `newest_whole('latest', ...)` then falls back to
the step before it with a one-line warning (train, eval, export and predict
all restore through it); training moves the bad steps aside as
`<step>.corrupt` so that it can save those steps again. With several
processes the step is agreed: a step that any process cannot read is
corrupt for all of them, so all restore the same one.
"""

import contextlib
import json
import logging
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from jax.experimental import multihost_utils

from stat_jax import storage
from stat_jax.checks.errors import UserError

BEST_METRIC = 'val_top1'

# The file of each item that must exist for the item to be read at all.
_ITEM_FILES = {'state': 'state/_METADATA', 'data': 'data/metadata',
               'config': 'config/metadata'}
CORRUPT_SUFFIX = '.corrupt'


class CorruptCheckpoint(UserError):
  """A checkpoint step that cannot be read whole."""


class NonFiniteState(FloatingPointError):
  """The training loss or the train state became NaN or infinite."""


# What a NaN stop tells the user to do next.
NON_FINITE_ADVICE = (' (to resume it with other settings, e.g. a lower '
                     'optimizer.base_lr, add --config.resume_with_changed_config'
                     '=True)')


@jax.jit
def _all_finite(tree):
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
  """Whether every float of `tree` (arrays, any sharding) is finite: one
  jitted reduction on device, one bool fetched."""
  return bool(_all_finite(tree))


@contextlib.contextmanager
def _quiet():
  """No orbax / tensorstore / absl log lines (a failed read logs per array,
  and its asyncio tasks each log their traceback)."""
  loggers = [logging.getLogger(name)
             for name in ('absl', 'orbax', 'jax', 'asyncio')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _reason(error: BaseException) -> str:
  """The first line of the innermost error (tensorstore's says which file)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines() or [type(error).__name__]
  return lines[0][:300]


# The data state of an imported checkpoint: no train data was read for it.
IMPORTED_DATA_STATE = {'imported': 1}


def checkpoint_dir(workdir: str) -> str:
  """Where the checkpoints of the run directory `workdir` are."""
  return storage.join(workdir, 'checkpoints')


def _best_metric(metrics) -> float:
  return metrics[BEST_METRIC]


class Checkpointer:
  """Saves and restores the checkpoints of one run directory."""

  def __init__(self, directory: str, keep: int, *, read_only: bool = False):
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=_best_metric, n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        best_fn=_best_metric, best_mode='max', read_only=read_only,
        enable_async_checkpointing=True, create=not read_only)
    self.directory = storage.absolute(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    # Restores run in each process on its own, with none of orbax's
    # barriers: a process that fails to read would leave the others waiting
    # in one. _read then agrees on the outcome.
    with _quiet():  # its read_only options are logged as warnings
      self._reader = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              read_only=True, multiprocessing_options=ocp.options.
              MultiprocessingOptions(primary_host=jax.process_index(),
                                     active_processes={jax.process_index()})))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  def _read(self, step: int, **items):
    """The `items` (name -> orbax restore args) of checkpoint `step`;
    CorruptCheckpoint on every process if any process cannot read them
    whole (the processes agree, so all restore the same step)."""
    try:
      restored, error = self._read_here(step, **items), None
    except CorruptCheckpoint as raised:
      restored, error = None, raised
      if jax.process_index():
        print(f'warning: process {jax.process_index()}: {error}',
              file=sys.stderr, flush=True)
    failing = _failing_processes(error is not None)
    if failing:
      raise error or CorruptCheckpoint(
          f'checkpoint step {step} ({self.step_dir(step)}) cannot be read by '
          f'process(es) {", ".join(map(str, failing))}')
    return restored

  def _read_here(self, step: int, **items):
    """_read for this process alone."""
    for name in items:
      path = storage.join(self.step_dir(step), _ITEM_FILES[name])
      if not tf.io.gfile.exists(path):
        raise CorruptCheckpoint(f'checkpoint step {step} is incomplete: '
                                f'{path} is missing')
    try:
      with _quiet():
        return self._reader.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # tensorstore / orbax raise many types
      raise CorruptCheckpoint(
          f'checkpoint step {step} ({self.step_dir(step)}) cannot be read: '
          f'{_reason(error)}') from error

  def newest_whole(self, which: str | int, attempt, *, move_aside=False):
    """(step, attempt(step)) for the checkpoint `which` names ('latest',
    'best' or a step). With 'latest', a step that attempt() finds corrupt
    (CorruptCheckpoint) gives a one-line warning and the step before it is
    tried; with `move_aside` (training), once an older step restores, the
    bad ones are renamed `<step>.corrupt`. If no step restores, the error
    names every step's fault and nothing is moved."""
    if which != 'latest':
      step = self.resolve(which)
      return step, attempt(step)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      self.resolve(which)  # the 'no checkpoint' error
    bad = []
    for step in steps:
      try:
        result = attempt(step)
      except CorruptCheckpoint as error:
        bad.append((step, error))
        if jax.process_index() == 0:
          print(f'warning: {error}; trying the checkpoint before it',
                file=sys.stderr, flush=True)
        continue
      if bad and move_aside:
        self._move_aside([s for s, _ in bad])
      return step, result
    raise CorruptCheckpoint(f'no checkpoint in {self.directory} can be read '
                            'whole: ' + '; '.join(str(e) for _, e in bad))

  def _move_aside(self, steps) -> None:
    if jax.process_index() == 0:
      for step in steps:
        target = self.step_dir(step) + CORRUPT_SUFFIX
        suffix = 1
        while tf.io.gfile.exists(target):
          target, suffix = f'{self.step_dir(step)}{CORRUPT_SUFFIX}{suffix}', suffix + 1
        tf.io.gfile.rename(self.step_dir(step), target)
        print(f'warning: moved the unreadable checkpoint step {step} to '
              f'{target}', file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('stat_jax: corrupt checkpoints moved')
    self._manager.reload()

  def resolve(self, which: str | int) -> int:
    """'latest', 'best' or a step number -> an existing step, else an error."""
    steps = self._manager.all_steps()
    if which == 'latest':
      step = self._manager.latest_step()
    elif which == 'best':
      step = self._manager.best_step()
    else:
      step = int(which)
    if step is None or step not in steps:
      raise FileNotFoundError(
          f'no checkpoint {which!r} in {self.directory} (steps: {sorted(steps)})')
    return step

  def save(self, step: int, state, data_state: dict,
           config: ml_collections.ConfigDict, metrics: dict | None = None):
    """Start an asynchronous save; `wait()` blocks until it is on disk.
    `data_state` is this process's iterator state (a dict of ints). A state
    holding NaN/inf is never saved: NonFiniteState names the newest
    checkpoint (all of them are finite)."""
    if not all_finite(state):
      self.wait()
      raise NonFiniteState(
          f'the train state after step {step} holds NaN/inf values; not '
          f'saved, stopping. Last good checkpoint: step {self.latest_step()} '
          f'in {self.directory}{NON_FINITE_ADVICE}')
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'processes': gather_int_dicts(data_state)}),
        config=ocp.args.JsonSave(json.loads(config.to_json()))),
        metrics=metrics)

  def restore(self, step: int, abstract_state):
    """(state laid out like `abstract_state`, the data states of every
    process that saved, in process order, config dict)."""
    restored = self._read(
        step, state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    self._check_finite(step, restored['state'])
    return (restored['state'], restored['data']['processes'],
            restored['config'])

  def holds_import(self, step: int) -> bool:
    """Whether checkpoint `step` holds weights imported from another
    framework (stat_jax.deploy.import_torch): a start, not a run that read
    train data and could resume."""
    try:
      data = self._read(step, data=ocp.args.JsonRestore())['data']
    except CorruptCheckpoint:
      return False  # resume's fallback deals with it
    return data['processes'] == [IMPORTED_DATA_STATE]

  def restore_config(self, step: int) -> dict:
    return self._read(step, config=ocp.args.JsonRestore())['config']

  def restore_state(self, step: int, abstract_state):
    state = self._read(
        step, state=ocp.args.StandardRestore(abstract_state))['state']
    self._check_finite(step, state)
    return state

  def _check_finite(self, step: int, state) -> None:
    if not all_finite(state):
      raise CorruptCheckpoint(f'checkpoint step {step} ({self.step_dir(step)})'
                              ' holds NaN/inf values')

  @contextlib.contextmanager
  def saves_kept_on_error(self):
    """On any exception in the block (Ctrl-C included), the saves in flight
    are finished and kept before it propagates: a crash after step N loses
    the steps since the last save, never the checkpoint being written."""
    try:
      yield
    except BaseException:
      try:
        self.wait()
      except Exception as error:  # the save itself failed: say so, go on
        print(f'warning: finishing the checkpoint in flight failed: '
              f'{_reason(error)}', file=sys.stderr, flush=True)
      else:
        if (jax.process_index() == 0 and self.latest_step() is not None
            and not isinstance(sys.exc_info()[1], NonFiniteState)):
          print(f'Stopped by an error; checkpoint step {self.latest_step()} '
                f'in {self.directory} is whole: run the same command again '
                'to resume from it.', file=sys.stderr, flush=True)
      raise

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
    self._reader.close()


def _failing_processes(failed_here: bool) -> list[int]:
  """The processes for which a restore failed, the same list on every one
  (a collective: every process calls it for every step it tries), so that
  all fall back to the same step."""
  if jax.process_count() == 1:
    return [0] if failed_here else []
  failed = multihost_utils.process_allgather(np.int32(failed_here))
  return np.flatnonzero(failed).tolist()


def gather_int_dicts(local: dict) -> list[dict]:
  """Every process's dict of int32-sized ints (same keys everywhere), in
  process order. A collective: every process must call it."""
  keys = sorted(local)
  rows = multihost_utils.process_allgather(
      np.array([local[key] for key in keys], np.int32))
  return [dict(zip(keys, row)) for row in rows.reshape(-1, len(keys)).tolist()]
