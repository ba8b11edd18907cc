"""Orbax checkpoints of a run: train state, data iterator position, config.

Each checkpoint `<workdir>/checkpoints/<step>/` holds
  state   the train state (params, optimizer state, step) as sharded arrays,
  data    the input iterator position of every process, in process order
          ({'processes': [state of process 0, ...]}, a few integers each;
          see data/pipeline.py),
  config  the experiment config as JSON.
The latest `keep` checkpoints are kept, plus the best by validation top-1.
Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed while saving leaves the previous one as latest.

Multi-process: every process calls every method. Each writes the shards of
the arrays it holds; process 0 writes the JSON items and commits. The state
restores onto any mesh (it is resharded to the shardings asked for), e.g. a
2-process checkpoint onto 1 process for eval.py; resuming training needs the
process count that wrote it, since each process continues its own part of
the data.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from stat_jax.errors import UserError

BEST_METRIC = 'val_top1'


def checkpoint_dir(workdir: str) -> str:
  """Where the checkpoints of the run directory `workdir` are."""
  return os.path.join(workdir, 'checkpoints')


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
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

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
    `data_state` is this process's iterator state (a dict of ints)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({'processes': gather_int_dicts(data_state)}),
        config=ocp.args.JsonSave(json.loads(config.to_json()))),
        metrics=metrics)

  def restore(self, step: int, abstract_state):
    """(state laid out like `abstract_state`, this process's data state,
    config dict)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    data_states = restored['data']['processes']
    if len(data_states) != jax.process_count():
      raise UserError(
          f'checkpoint step {step} in {self.directory} was written by '
          f'{len(data_states)} process(es); resume it with '
          f'{len(data_states)} (eval.py restores it on any number)')
    return (restored['state'], data_states[jax.process_index()],
            restored['config'])

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))['config']

  def restore_state(self, step: int, abstract_state):
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def gather_int_dicts(local: dict) -> list[dict]:
  """Every process's dict of int32-sized ints (same keys everywhere), in
  process order. A collective: every process must call it."""
  keys = sorted(local)
  rows = multihost_utils.process_allgather(
      np.array([local[key] for key in keys], np.int32))
  return [dict(zip(keys, row)) for row in rows.reshape(-1, len(keys)).tolist()]
