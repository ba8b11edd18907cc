"""Training and evaluation of STAT, top to bottom.

Phases (banners below): setup (config, mesh, data) -> model and optimizer
(abstract init, sharded init or restore) -> compile -> loop (step, log,
NaN guard, checkpoint, evaluate) -> finish. Evaluation helpers at the end
serve both the loop and eval.py.
"""

import json
import time

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from jax.experimental import multihost_utils

from data import labels
from data import eval_pipeline
from data import train_pipeline
from stat_jax import checkpoint, confusion, metrics, optim, sharding
from stat_jax import config_compare, preflight, storage
from stat_jax.config_validation import validate
from stat_jax.eval_images import EvalImages
from stat_jax.evaluation import (EVAL_SCALARS, ViewAccumulator, format_accuracy,
                                 format_summary, time_reversed, write_report)
from stat_jax.flops import model_macs
from stat_jax.preemption import watch as watch_preemption
from stat_jax.train_state import (abstract_train_state, init_train_state,
                                  with_shardings)
from stat_jax.train_step import abstract_batch, jit_train_step, make_eval_step
from stat_jax.transfer import load_pretrained


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


# The training loss or the train state became NaN or infinite (raised here
# for the loss, by Checkpointer.save for the state).
NonFiniteLoss = checkpoint.NonFiniteState


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict:
  """Train (resuming from workdir's latest checkpoint if any), evaluate.

  `stop_after` ends the run after that step with a checkpoint, as a
  pre-emption would (tests); a SIGTERM ends it after the current step, with
  a checkpoint (stat_jax/preemption.py). Returns {'losses': {step: loss},
  'eval': the last evaluation result or None, 'state': the final train
  state, 'preempted': whether a SIGTERM stopped it before its last step}.
  """
  # ------------------------------------------------------------- setup ---
  validate(config)
  preflight.check_before_training(config)
  preflight.check_writable(workdir)
  mesh = sharding.make_mesh(config)
  total_steps = optim.total_steps(config)
  sharding.check_batch(config.batch_size, mesh)
  train_data = train_pipeline.make_train_iterator(
      config, process_index=jax.process_index(),
      process_count=jax.process_count(),
      rows=sharding.process_rows(mesh, config.batch_size))
  labels.check_label_space(config, train_data.index)

  # ------------------------------------------ model, optimizer, state ---
  parts, tx, abstract_state, state_shardings = abstract_train_state(config, mesh)
  schedule = optim.learning_rate(config)
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir),
                                 config.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    start, state, data_states = resume(
        config, ckpt, with_shardings(abstract_state, state_shardings))
    train_data.set_state(data_states,
                         allow_data_change=config.data.allow_data_change)
    log(f'Resuming from step {start} ({ckpt.directory}).')
  else:
    state = jax.jit(lambda: init_train_state(parts, config.seed, tx),
                    out_shardings=state_shardings)()
    if config.init_from:
      state = state.replace(params=load_pretrained(
          config.init_from, state.params, log=log, target=config.model,
          report_path=storage.join(workdir, 'init_from.txt')))
    start = 0

  # ----------------------------------------------------------- compile ---
  train_step = jit_train_step(config, parts, tx, mesh, state_shardings)
  compile_start = time.perf_counter()
  train_step = train_step.lower(abstract_state, abstract_batch(config)).compile()
  report_memory(train_step, time.perf_counter() - compile_start)
  eval_step = jax.jit(make_eval_step(parts, config.data))
  eval_images = EvalImages(config, parts, mesh) if config.data.eval_spec else None

  # -------------------------------------------------------------- loop ---
  writer = metrics.make_writer(workdir)
  progress = metrics.Progress(total_steps, start, config.batch_size,
                              train_flops_per_clip=6 * model_macs(config))
  losses, pending, last_eval = {}, [], None
  loss_log = storage.join(workdir, 'train_log.jsonl')
  truncate_loss_log(loss_log, start)  # a resumed run replays what follows
  log(f'Training {total_steps} steps of {config.batch_size} clips on '
      f'{mesh.size} device(s) in {jax.process_count()} process(es) '
      f'(mesh {dict(mesh.shape)}).')
  last_step = min(total_steps, stop_after or total_steps)
  step = saved_step = start
  with watch_preemption() as preemption, ckpt.saves_kept_on_error():
    # One process: a SIGTERM while the iterator waits for clips stops the
    # run there. Several: `signalled` stays False (preemption.py), since a
    # process may not leave a step that the others have started.
    train_data.should_stop = lambda: preemption.signalled
    for step in range(start + 1, last_step + 1):
      try:
        batch = sharding.global_batch(next(train_data), mesh)
      except train_pipeline.Interrupted:  # SIGTERM while waiting for clips
        step -= 1
        losses.update(flush_losses(pending, ckpt, loss_log))
        if step > saved_step:
          ckpt.save(step, state, train_data.get_state(), config)
        break
      state, step_metrics = train_step(state, batch)
      pending.append((step, step_metrics))
      is_last = step == total_steps
      evaluate_now = is_last or step % config.eval_every == 0
      stopping = step == last_step or preemption.reached(step)
      save_now = (evaluate_now or stopping
                  or step % config.checkpoint_every == 0)
      if save_now or step % config.log_every == 0:
        flushed = flush_losses(pending, ckpt, loss_log)
        losses.update(flushed)
        pending = []
        rates = progress.report(step)
        lr = float(schedule(step - 1))
        writer.write_scalars(step, {
            'train_loss': np.mean(list(flushed.values())), 'learning_rate': lr,
            'grad_norm': float(step_metrics['grad_norm']),
            'clips_per_s': rates['clips_per_s'],
            'train_skipped_records': train_data.num_skipped})
        skipped, skip_warning = train_data.skip_report()
        log(progress.line(step, flushed[step], lr, rates) + skipped)
        if skip_warning:
          log(skip_warning)
      if evaluate_now and config.data.eval_spec:
        try:
          last_eval = evaluate(config, eval_step, state.params, mesh)
        except Exception:
          if save_now:  # keep the trained step (no metric); then the error
            ckpt.save(step, state, train_data.get_state(), config)
          raise
        writer.write_scalars(step, {f'val_{key}': value
                                    for key, value in last_eval.items()
                                    if key in EVAL_SCALARS})
        eval_images.write(writer, step, state.params, last_eval)
        log(f'step {step} | val {format_accuracy(last_eval)}')
      if save_now:
        ckpt.save(step, state, train_data.get_state(), config,
                  metrics=({checkpoint.BEST_METRIC: last_eval['top1']}
                           if evaluate_now and last_eval else None))
        saved_step = step
      if stopping:
        break

  # ------------------------------------------------------------ finish ---
  ckpt.wait()
  ckpt.close()
  writer.flush()
  if last_eval is not None and jax.process_index() == 0:
    write_report(last_eval, storage.join(workdir, 'eval_report.json'),
                 labels.class_names(config))
  log(f'TensorBoard logs: {storage.join(workdir, "tensorboard")}')
  preempted = step < last_step
  if preempted:
    log(f'Pre-empted (SIGTERM) after step {step}: checkpoint saved; run the '
        'same command again to resume.')
  log(f'Checkpoints: {ckpt.directory} (latest step {step})')
  return {'losses': losses, 'eval': last_eval, 'state': state,
          'preempted': preempted}


def resume(config, ckpt, abstract_state):
  """(step, state, the data states of the processes that saved it) of the
  newest whole checkpoint of `ckpt` (a corrupt or non-finite one is moved
  aside with a warning), after its saved config was compared with `config`
  (config_compare)."""

  def attempt(step):
    changed = config_compare.check_resume(ckpt.restore_config(step), config,
                                          step, ckpt.directory)
    if changed:
      log(f'Resuming step {step} under a changed config '
          f'(resume_with_changed_config): {", ".join(changed)}')
    state, data_states, _ = ckpt.restore(step, abstract_state)
    return state, data_states

  step, (state, data_states) = ckpt.newest_whole('latest', attempt,
                                                 move_aside=True)
  return step, state, data_states


def truncate_loss_log(path: str, step: int) -> None:
  """Drop the entries of train_log.jsonl after `step` (and a line cut short
  by a kill): the run continues from there, so each step is logged once."""
  if jax.process_index() != 0 or not tf.io.gfile.exists(path):
    return
  lines = storage.read_text(path).splitlines(keepends=True)

  def kept(line):
    try:
      return line.endswith('\n') and json.loads(line)['step'] <= step
    except (ValueError, KeyError, TypeError):
      return False

  keep = [line for line in lines if kept(line)]
  if len(keep) != len(lines):
    storage.write_text(path, ''.join(keep))


def flush_losses(pending, ckpt, path) -> dict:
  """Fetch the losses of the steps since the last flush; stop on NaN/inf."""
  losses = {step: float(m['loss']) for step, m in pending}
  for step, loss in losses.items():
    if not np.isfinite(loss):
      ckpt.wait()
      raise NonFiniteLoss(
          f'training loss is {loss} at step {step}; stopping. Last good '
          f'checkpoint: step {ckpt.latest_step()} in {ckpt.directory}'
          f'{checkpoint.NON_FINITE_ADVICE}')
  if jax.process_index() == 0:
    storage.append_text(path, ''.join(
        json.dumps({'step': step, 'loss': loss}) + '\n'
        for step, loss in losses.items()))
  return losses


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
      process_count=jax.process_count())
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
  validate(config)
  mesh = sharding.make_mesh(config)
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), 1,
                                 read_only=True)
  ckpt.resolve(which)  # no such checkpoint: said before the workdir is probed
  preflight.check_writable(workdir)  # the report goes there
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
