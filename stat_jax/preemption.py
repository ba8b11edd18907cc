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
"""

import contextlib
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  """`reached(step)`: stop after this step? Call it at every step."""

  def __init__(self):
    self.signalled = False

  def on_sigterm(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signalled
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service is off
      return False


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
