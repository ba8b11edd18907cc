"""Where a run's step time goes: a jax.profiler trace of a window of steps,
and the share of time the loop waits for its next batch.

`config.profile_steps = (start, count)` traces steps start .. start+count-1
into workdir/tensorboard/plugins/profile/<time>/<host>.xplane.pb, the
layout TensorBoard's profile plugin opens (`pip install
tensorboard-plugin-profile`); every process traces its own host. (0, 0) is
off.
A run resumed past `start` takes no trace.

The data wait is the time the loop spends getting the next global batch
(the input pipeline and its transfer to the devices) over the wall time
since the previous report, as process 0 sees it: near 0 when the devices
bound the step, near 1 when the input does.
"""

import contextlib
import time

import jax

from stat_jax import metrics, storage


class ProfileWindow:
  """Starts and stops the trace around the configured steps."""

  def __init__(self, profile_steps, workdir: str):
    self.start, count = profile_steps
    self.last = self.start + count - 1
    self.log_dir = metrics.tensorboard_dir(workdir)
    self.tracing = False

  def before_step(self, step: int) -> None:
    if step == self.start and self.last >= self.start:
      jax.profiler.start_trace(self.log_dir)
      self.tracing = True

  def after_step(self, step: int, outputs) -> str | None:
    """Ends the trace after its last step, once `outputs` are computed; a
    line saying where it is then, else None."""
    if not self.tracing or step != self.last:
      return None
    jax.block_until_ready(outputs)
    self.stop()
    return (f'Profile of steps {self.start}-{self.last}: '
            f'{storage.join(self.log_dir, "plugins", "profile")}')

  def stop(self) -> None:
    """Ends a trace in progress (a run that stops inside the window)."""
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


class DataWait:
  """The share of wall time spent in `waiting()` since the last `share()`."""

  def __init__(self):
    self._waited, self._since = 0.0, time.perf_counter()

  @contextlib.contextmanager
  def waiting(self):
    begin = time.perf_counter()
    try:
      yield
    finally:
      self._waited += time.perf_counter() - begin

  def share(self) -> float:
    """The share since the previous call (or the start); restarts it."""
    now = time.perf_counter()
    share = self._waited / max(now - self._since, 1e-9)
    self._waited, self._since = 0.0, now
    return share
