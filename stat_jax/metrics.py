"""What a run reports: clu metric writers (TensorBoard + console) and a
progress line with step/s, clips/s, ETA and model FLOP utilisation."""

import time

import jax
from clu import metric_writers

from stat_jax import chips, storage


def peak_flops(device) -> float | None:
  """Dense bf16 peak FLOP/s of one device (stat_jax/chips.py), or None
  where unknown (e.g. CPUs)."""
  figures = chips.chip(device)
  return figures.bf16_flops if figures else None


def tensorboard_dir(workdir: str) -> str:
  """Where a run's TensorBoard event files and profiles go."""
  return storage.join(workdir, 'tensorboard')


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files under workdir/tensorboard on process 0 only."""
  return metric_writers.create_default_writer(
      tensorboard_dir(workdir), just_logging=jax.process_index() > 0,
      asynchronous=True)


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'


class Progress:
  """Throughput since the previous report, ETA and MFU."""

  def __init__(self, total_steps: int, step: int, batch_size: int,
               train_flops_per_clip: float):
    self.total_steps, self.batch_size = total_steps, batch_size
    self.flops_per_clip = train_flops_per_clip
    devices = jax.devices()
    peak = peak_flops(devices[0])
    self.peak = peak * len(devices) if peak else None
    self._step, self._time = step, time.perf_counter()

  def report(self, step: int) -> dict:
    now = time.perf_counter()
    steps_per_s = (step - self._step) / max(now - self._time, 1e-9)
    self._step, self._time = step, now
    clips_per_s = steps_per_s * self.batch_size
    return {
        'steps_per_s': steps_per_s,
        'clips_per_s': clips_per_s,
        'eta_s': (self.total_steps - step) / max(steps_per_s, 1e-9),
        'mfu': (clips_per_s * self.flops_per_clip / self.peak
                if self.peak else None),
    }

  def line(self, step: int, loss: float, lr: float, rates: dict) -> str:
    mfu = f'{rates["mfu"]:.1%}' if rates['mfu'] is not None else 'n/a'
    return (f'step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | '
            f'{rates["steps_per_s"]:.2f} step/s | {rates["clips_per_s"]:.1f} '
            f'clips/s | ETA {format_duration(rates["eta_s"])} | MFU {mfu}')
