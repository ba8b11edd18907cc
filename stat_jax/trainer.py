"""Training and evaluation of STAT, top to bottom.

train_and_evaluate reads as its phases: setup (config, mesh, data) -> state
(abstract init, sharded init or restore) -> compile -> loop -> finish. Each
step of the loop trains, then does what the step is due for (due_after):
log, evaluate, save, stop. The helpers below it follow that order; the
evaluation at the end serves both the loop and eval.py.

Stops: the last step, `stop_after`, and pre-emption (a SIGTERM,
stat_jax/preemption.py). A pre-empted step is saved at once and not
evaluated: an evaluation can outlast the grace period before the kill.
"""

import dataclasses
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from stat_jax.data import labels
from stat_jax.data import eval_pipeline
from stat_jax.data import train_pipeline
from stat_jax import checkpoint, confusion, optim, sharding
from stat_jax import metrics, profiling, storage
from stat_jax.checks import config as config_checks
from stat_jax.checks import data as data_checks
from stat_jax.checks import workdir as workdir_checks
from stat_jax.checks.errors import UserError
from stat_jax.eval_images import EvalImages
from stat_jax.evaluation import (EVAL_SCALARS, ViewAccumulator, format_accuracy,
                                 format_summary, time_reversed, write_report)
from stat_jax.preemption import watch as watch_preemption
from stat_jax.train_log import NonFiniteLoss, TrainLog, log
from stat_jax.train_state import (abstract_train_state, init_train_state,
                                  with_shardings)
from stat_jax.train_step import abstract_batch, jit_train_step, make_eval_step
from stat_jax.transfer import load_pretrained

__all__ = ['NonFiniteLoss', 'train_and_evaluate', 'evaluate',
           'evaluate_checkpoint']


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict:
  """Train (resuming from workdir's latest checkpoint if any), evaluate.

  `stop_after` ends the run after that step with a checkpoint (tests); a
  SIGTERM ends it after the current step, with a checkpoint and without
  its evaluation (stat_jax/preemption.py). Returns {'losses': {step: loss},
  'eval': the last evaluation result or None, 'state': the final train
  state, 'preempted': whether a SIGTERM stopped it (its last step saved,
  not evaluated)}.
  """
  # ------------------------------------------------------------- setup ---
  # The checks in the order of stat_jax/checks/__init__.py.
  config_checks.validate(config)
  mesh = sharding.make_mesh(config)
  config_checks.check_batch_on_mesh(config, mesh)
  data_checks.check_eval_spec(config)
  train_data = train_pipeline.make_train_iterator(
      config, process_index=jax.process_index(),
      process_count=jax.process_count(),
      rows=sharding.process_rows(mesh, config.batch_size))
  data_checks.check_label_space(config, train_data.index)
  workdir_checks.check_writable(workdir)

  # ------------------------------------------ model, optimizer, state ---
  parts, tx, abstract_state, state_shardings = abstract_train_state(config, mesh)
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir),
                                 config.keep_checkpoints)
  start, state = restore_or_init(
      config, workdir, ckpt, train_data,
      with_shardings(abstract_state, state_shardings),
      lambda: init_train_state(parts, config.seed, tx))

  # ----------------------------------------------------------- compile ---
  train_step = compile_train_step(
      jit_train_step(config, parts, tx, mesh, state_shardings),
      abstract_state, abstract_batch(config))
  train_log = TrainLog(config, workdir, start, ckpt)
  evaluate_in_loop = loop_evaluation(config, parts, mesh, train_log.writer)
  window = profiling.ProfileWindow(config.profile_steps, workdir)

  # -------------------------------------------------------------- loop ---
  total_steps = optim.total_steps(config)
  last_step = min(total_steps, stop_after or total_steps)
  log(f'Training {total_steps} steps of {config.batch_size} clips on '
      f'{mesh.size} device(s) in {jax.process_count()} process(es) '
      f'(mesh {dict(mesh.shape)}).')
  step, last_eval, preempted = start, None, False
  # Saves the state of the moment (bound when called).
  save = lambda step, result=None: save_checkpoint(ckpt, step, state,
                                                   train_data, config, result)
  with watch_preemption() as preemption, ckpt.saves_kept_on_error():
    # One process: a SIGTERM while the iterator waits for clips stops the
    # run there. Several: `signalled` stays False (preemption.py), since a
    # process may not leave a step that the others have started.
    train_data.should_stop = lambda: preemption.signalled
    for step in range(start + 1, last_step + 1):
      window.before_step(step)
      with train_log.data_wait.waiting():
        batch = next_global_batch(train_data, mesh)
      if batch is None:  # SIGTERM while waiting for clips
        step, preempted = step - 1, True
        stop_before_step(step, ckpt, train_log, save)
        break
      state, step_metrics = train_step(state, batch)
      profiled = window.after_step(step, step_metrics)
      if profiled:
        log(profiled)
      train_log.add(step, step_metrics)
      preempted = preemption.reached(step)
      due = due_after(step, config, total_steps, last_step, preempted)
      if due.log:
        train_log.report(step, step_metrics, train_data)
      if preempted:
        stop_preempted(step, due, save)
        break
      if due.evaluate:
        last_eval = evaluate_then_save(step, state.params, evaluate_in_loop,
                                       save)
      elif due.save:
        save(step)
      if due.stop:
        break

  # ------------------------------------------------------------ finish ---
  window.stop()  # a run that stopped inside the window
  finish(ckpt, train_log, config, workdir, step, last_eval, preempted)
  return {'losses': train_log.losses, 'eval': last_eval, 'state': state,
          'preempted': preempted}


# ------------------------------------------------------------- state ---

def restore_or_init(config, workdir, ckpt, train_data, abstract_state,
                    init_fn):
  """(start step, train state): workdir's newest whole checkpoint, with the
  data position it saved, or a fresh state (init_fn, laid out as
  `abstract_state`; config.init_from's parameters if set, with the table
  of what they gave written to the workdir's init_from.txt) at step 0."""
  if ckpt.latest_step() is not None:
    if ckpt.holds_import(ckpt.latest_step()):
      raise UserError(
          f'{workdir} holds imported weights (stat_jax.deploy.import_torch), '
          'not a run to resume: train from them in a new workdir with '
          f'--config.init_from={workdir}')
    start, state, data_states = resume(config, ckpt, abstract_state)
    train_data.set_state(data_states,
                         allow_data_change=config.data.allow_data_change)
    log(f'Resuming from step {start} ({ckpt.directory}).')
    return start, state
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  state = jax.jit(init_fn, out_shardings=shardings)()
  if config.init_from:
    state = state.replace(params=load_pretrained(
        config.init_from, state.params, log=log, target=config.model,
        report_path=storage.join(workdir, 'init_from.txt')))
  return 0, state


def resume(config, ckpt, abstract_state):
  """(step, state, the data states of the processes that saved it) of the
  newest whole checkpoint of `ckpt` (a corrupt or non-finite one is moved
  aside with a warning; every process restores the same step), after its
  saved config was compared with `config` (checks/workdir.py)."""

  def attempt(step):
    changed = workdir_checks.check_resume(ckpt.restore_config(step), config,
                                          step, ckpt.directory)
    if changed:
      log(f'Resuming step {step} under a changed config '
          f'(resume_with_changed_config): {", ".join(changed)}')
    state, data_states, _ = ckpt.restore(step, abstract_state)
    return state, data_states

  step, (state, data_states) = ckpt.newest_whole('latest', attempt,
                                                 move_aside=True)
  return step, state, data_states


# ----------------------------------------------------------- compile ---

def compile_train_step(train_step, abstract_state, abstract_batch_):
  """The jitted step compiled before the first batch, its memory logged."""
  compile_start = time.perf_counter()
  compiled = train_step.lower(abstract_state, abstract_batch_).compile()
  report_memory(compiled, time.perf_counter() - compile_start)
  return compiled


def report_memory(compiled, seconds: float) -> None:
  """Tell what one step costs before it runs (MaxText style)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    log(f'Compiled the train step in {seconds:.1f}s.')
    return
  gib = lambda n: n / 2**30
  log(f'Compiled the train step in {seconds:.1f}s; per device: arguments '
      f'{gib(analysis.argument_size_in_bytes):.2f} GiB, temporaries '
      f'{gib(analysis.temp_size_in_bytes):.2f} GiB, outputs '
      f'{gib(analysis.output_size_in_bytes):.2f} GiB.')


# -------------------------------------------------------------- step ---

def next_global_batch(train_data, mesh) -> dict | None:
  """The next global batch, split over the mesh; None if a stop request
  (SIGTERM) came while the iterator waited for clips."""
  try:
    return sharding.global_batch(next(train_data), mesh)
  except train_pipeline.Interrupted:
    return None


@dataclasses.dataclass(frozen=True)
class Due:
  """What a trained step is due for."""
  log: bool  # fetch the losses, the progress line
  evaluate: bool  # an evaluation (data.eval_spec set), unless pre-empted
  save: bool
  stop: bool  # the last step of this run


def due_after(step: int, config, total_steps: int, last_step: int,
              preempted: bool) -> Due:
  """Every step at which the run stops is saved (and logged)."""
  eval_step = step == total_steps or step % config.eval_every == 0
  stop = step == last_step or preempted
  save = eval_step or stop or step % config.checkpoint_every == 0
  return Due(log=save or step % config.log_every == 0,
             evaluate=eval_step and bool(config.data.eval_spec),
             save=save, stop=stop)


def save_checkpoint(ckpt, step, state, train_data, config, result=None):
  """Start the save of `step`; an evaluation `result` ranks it (best kept)."""
  ckpt.save(step, state, train_data.get_state(), config,
            metrics=({checkpoint.BEST_METRIC: result['top1']}
                     if result else None))


# ------------------------------------------------- evaluate, in the loop ---

def evaluate_then_save(step, params, evaluate_in_loop, save) -> dict:
  """The evaluation of `step`, then its save ranked by it. If the
  evaluation fails, the step is saved without a rank before the error
  propagates."""
  try:
    result = evaluate_in_loop(step, params)
  except Exception:
    save(step)
    raise
  save(step, result)
  return result


def loop_evaluation(config, parts, mesh, writer):
  """evaluate_in_loop(step, params) -> evaluate()'s result, written to
  TensorBoard (scalars, images) and the log."""
  eval_step = jax.jit(make_eval_step(parts, config.data))
  eval_images = EvalImages(config, parts, mesh) if config.data.eval_spec else None

  def evaluate_in_loop(step, params):
    result = evaluate(config, eval_step, params, mesh)
    writer.write_scalars(step, {f'val_{key}': value
                                for key, value in result.items()
                                if key in EVAL_SCALARS})
    eval_images.write(writer, step, params, result)
    log(f'step {step} | val {format_accuracy(result)}')
    return result

  return evaluate_in_loop


# -------------------------------------------------------------- stop ---

def stop_before_step(step, ckpt, train_log, save) -> None:
  """A stop request between steps: the steps trained are logged and the
  last of them saved (unless it is saved already)."""
  train_log.flush()
  if step > 0 and step != ckpt.latest_step():
    save(step)


def stop_preempted(step, due, save) -> None:
  """Save the pre-empted step at once; its evaluation is skipped."""
  save(step)
  if due.evaluate:
    log(f'Pre-empted at step {step}: its evaluation is skipped (python '
        f'eval.py --checkpoint={step} runs it).')


def finish(ckpt, train_log, config, workdir, step, last_eval,
           preempted) -> None:
  """Wait for the saves; the eval report; where things are."""
  ckpt.wait()
  ckpt.close()
  train_log.writer.flush()
  if last_eval is not None and jax.process_index() == 0:
    write_report(last_eval, storage.join(workdir, 'eval_report.json'),
                 labels.class_names(config))
  log(f'TensorBoard logs: {metrics.tensorboard_dir(workdir)}')
  if preempted:
    log(f'Pre-empted (SIGTERM) after step {step}: checkpoint saved; run the '
        'same command again to resume.')
  log(f'Checkpoints: {ckpt.directory} (latest step {step})')


# -------------------------------------------------------------- evaluate ---

def evaluate(config, eval_step, params, mesh) -> dict:
  """Multi-view evaluation of every eval video exactly once. With
  config.data.reversed_classes set, each batch is also played backwards in
  the same pass (evaluation.time_reversed), and the result holds
  'time_reversed_top1': how often a val clip played backwards gets the
  reversed class (temporal order used).

  Each process reads its part of the videos; every batch row (probabilities
  with its video id, label and mask) is gathered to every process, so each
  returns the result over all videos. A collective in multi-process runs.
  """
  views = eval_pipeline.make_eval_iterator(
      config, process_index=jax.process_index(),
      process_count=jax.process_count(),
      devices_per_process=len(mesh.local_devices))
  forward = ViewAccumulator(config.model.num_classes)
  reversed_classes = tuple(config.data.reversed_classes)
  backward = (ViewAccumulator(config.model.num_classes)
              if reversed_classes else None)
  for batch in views:
    add_views(forward, batch, eval_step, params, mesh)
    if backward is not None:
      add_views(backward, time_reversed(batch, reversed_classes), eval_step,
                params, mesh)
  result = forward.result()
  result['confusion_matrix'] = confusion.gathered(
      result['predictions'], config.model.num_classes).tolist()
  if backward is not None:
    result['time_reversed_top1'] = backward.result()['top1']
  result['skipped'] = int(
      multihost_utils.process_allgather(np.int64(views.num_skipped)).sum())
  return result


def add_views(accumulator, batch, eval_step, params, mesh) -> None:
  """The softmax of one eval batch's views, with their video ids, labels and
  masks gathered from every process, into `accumulator`."""
  rows = sharding.global_batch(
      {key: batch[key] for key in ('video', 'video_id', 'label', 'mask')},
      mesh)
  rows['probs'] = eval_step(params, rows.pop('video'))
  rows = multihost_utils.process_allgather(rows, tiled=True)
  accumulator.add(rows['probs'], rows['video_id'], rows['label'], rows['mask'])


def evaluate_checkpoint(config, workdir: str, which: str = 'latest') -> dict:
  """eval.py: restore a checkpoint of workdir, evaluate, write the report."""
  config_checks.validate(config)
  mesh = sharding.make_mesh(config)
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), 1,
                                 read_only=True)
  ckpt.resolve(which)  # no such checkpoint: said before the workdir is probed
  workdir_checks.check_writable(workdir)  # the report goes there
  parts, _, abstract_state, state_shardings = abstract_train_state(config, mesh)
  step, state = ckpt.newest_whole(which, lambda step: ckpt.restore_state(
      step, with_shardings(abstract_state, state_shardings)))
  result = evaluate(config, jax.jit(make_eval_step(parts, config.data)),
                    state.params, mesh)
  result['checkpoint_step'] = step
  if jax.process_index() == 0:
    path = storage.join(workdir, f'eval_step{step}.json')
    names = labels.class_names(config)
    write_report(result, path, names)
    log(format_summary(result, names))
    log(f'Report: {path}')
  return result
