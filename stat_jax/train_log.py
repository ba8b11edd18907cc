"""What the training loop reports per step: the losses (fetched from the
device in batches, checked for NaN/inf, appended to train_log.jsonl), the
progress line and the TensorBoard scalars."""

import json

import jax
import numpy as np
import tensorflow as tf

from stat_jax import checkpoint, metrics, optim, profiling, storage
from stat_jax.flops import model_macs

# The training loss or the train state became NaN or infinite (raised here
# for the loss, by Checkpointer.save for the state).
NonFiniteLoss = checkpoint.NonFiniteState


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


class TrainLog:
  """add(step, step_metrics) after every step; report(...) at a logged
  step fetches the losses since the previous one. `losses`: {step: loss}
  of every step fetched."""

  def __init__(self, config, workdir: str, start: int, ckpt):
    self._ckpt = ckpt
    self._path = storage.join(workdir, 'train_log.jsonl')
    self._schedule = optim.learning_rate(config)
    self._writer = metrics.make_writer(workdir)
    self._progress = metrics.Progress(
        optim.total_steps(config), start, config.batch_size,
        train_flops_per_clip=6 * model_macs(config))
    self._pending = []  # (step, metrics on the device) not fetched yet
    self.data_wait = profiling.DataWait()  # the loop's waits for batches
    self.losses = {}
    truncate_loss_log(self._path, start)  # a resumed run replays what follows

  @property
  def writer(self):
    return self._writer

  def add(self, step: int, step_metrics: dict) -> None:
    self._pending.append((step, step_metrics))

  def flush(self) -> dict:
    """Fetch the losses of the steps since the last flush, append them to
    train_log.jsonl; NonFiniteLoss on NaN/inf."""
    fetched = {step: float(m['loss']) for step, m in self._pending}
    self._pending = []
    for step, loss in fetched.items():
      if not np.isfinite(loss):
        self._ckpt.wait()
        raise NonFiniteLoss(
            f'training loss is {loss} at step {step}; stopping. Last good '
            f'checkpoint: step {self._ckpt.latest_step()} in '
            f'{self._ckpt.directory}{checkpoint.NON_FINITE_ADVICE}')
    if jax.process_index() == 0:
      storage.append_text(self._path, ''.join(
          json.dumps({'step': step, 'loss': loss}) + '\n'
          for step, loss in fetched.items()))
    self.losses.update(fetched)
    return fetched

  def report(self, step: int, step_metrics: dict, train_data) -> None:
    """Flush; the progress line and TensorBoard scalars of `step`."""
    fetched = self.flush()
    rates = self._progress.report(step)
    waited = self.data_wait.share()
    lr = float(self._schedule(step - 1))
    self._writer.write_scalars(step, {
        'train_loss': np.mean(list(fetched.values())), 'learning_rate': lr,
        'grad_norm': float(step_metrics['grad_norm']),
        'clips_per_s': rates['clips_per_s'], 'data_wait_share': waited,
        'train_skipped_records': train_data.num_skipped})
    skipped, skip_warning = train_data.skip_report()
    log(self._progress.line(step, fetched[step], lr, rates)
        + f' | data wait {waited:.0%}' + skipped)
    if skip_warning:
      log(skip_warning)


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
