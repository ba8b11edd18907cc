"""Pre-emption: SIGTERM ends training after the current step, with a checkpoint.

One process: a SIGTERM handler (main thread only, for the duration of
`watch`) raises a flag that the loop reads after every step. Several
processes: JAX's coordination service catches SIGTERM on any host and names
a step at which every process stops (`reached_preemption_sync_point`, what
orbax's `CheckpointManager.reached_preemption` asks), so all save the same
step and none waits on a collective the others left. A process waiting for
its data then keeps waiting (the flag is for one process only): the others
may have started the next step, whose collectives would hang without it;
the sync point (the furthest process's step + 1) comes once its batch does.

Without the coordination service's pre-emption support
(jax_enable_preemption_service off: the one documented case in which the
sync-point query raises), a multi-process run is warned once that a
SIGTERM will kill it without a checkpoint; any other error of the query is
raised, never taken for "not pre-empted".
"""

import contextlib
import signal
import threading

import sys

import jax
from jax.experimental import multihost_utils


def service_enabled() -> bool:
  """Whether the coordination service watches for pre-emption notices."""
  return bool(jax.config.jax_enable_preemption_service)


class Preemption:
  """`reached(step)`: stop after this step? Call it at every step."""

  def __init__(self):
    self.signalled = False
    self._warned = False

  def on_sigterm(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    if not service_enabled():
      if not self._warned and jax.process_index() == 0:
        print('warning: jax_enable_preemption_service is off: a SIGTERM '
              'stops this multi-process run without a checkpoint',
              file=sys.stderr, flush=True)
      self._warned = True
      return False
    return multihost_utils.reached_preemption_sync_point(step)


@contextlib.contextmanager
def watch():
  """Yields a Preemption; in a single process, SIGTERM only sets its flag
  inside the block (the previous handler comes back after it)."""
  preemption = Preemption()
  if (jax.process_count() > 1
      or threading.current_thread() is not threading.main_thread()):
    yield preemption
    return
  previous = signal.signal(signal.SIGTERM, preemption.on_sigterm)
  try:
    yield preemption
  finally:
    signal.signal(signal.SIGTERM, previous)
