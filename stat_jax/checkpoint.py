"""Orbax checkpoints of a run: train state, data iterator position, config.

Each checkpoint `<workdir>/checkpoints/<step>/` holds
  state   the train state (params, optimizer state, step) as sharded arrays,
  data    the input iterator's position (a few integers; see data/pipeline.py),
  config  the experiment config as JSON.
The latest `keep` checkpoints are kept, plus the best by validation top-1.
Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed while saving leaves the previous one as latest.
"""

import json
import os

import ml_collections
import orbax.checkpoint as ocp

BEST_METRIC = 'val_top1'


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
    """Start an asynchronous save; `wait()` blocks until it is on disk."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config.to_json()))),
        metrics=metrics)

  def restore(self, step: int, abstract_state):
    """(state laid out like `abstract_state`, data state, config dict)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return restored['state'], restored['data'], restored['config']

  def restore_state(self, step: int, abstract_state):
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
