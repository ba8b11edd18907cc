"""stat_jax/profiling.py: the profiler window traces exactly its steps into
the layout TensorBoard's profile plugin reads, and the data wait share is
waiting time over wall time, by a clock set by hand."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from stat_jax import profiling


def run_steps(window: profiling.ProfileWindow, steps) -> dict:
  """{step: the line after_step gave} for a loop of a small program."""
  @jax.jit
  def window_probe_step(x):
    return jnp.tanh(x @ x.T)
  lines, x = {}, jnp.ones((32, 32))
  for step in steps:
    window.before_step(step)
    x = window_probe_step(x)
    lines[step] = window.after_step(step, x)
  window.stop()
  return lines


def traces(workdir) -> list[str]:
  return glob.glob(os.path.join(workdir, 'tensorboard', 'plugins', 'profile',
                                '*', '*.xplane.pb'))


def test_the_window_traces_its_steps_for_tensorboard(tmp_path):
  lines = run_steps(profiling.ProfileWindow((2, 2), str(tmp_path)), range(1, 6))
  profile_dir = os.path.join(tmp_path, 'tensorboard', 'plugins', 'profile')
  assert lines == {1: None, 2: None, 4: None, 5: None,
                   3: f'Profile of steps 2-3: {profile_dir}'}
  (trace,) = traces(tmp_path)
  with open(trace, 'rb') as f:
    assert b'window_probe_step' in f.read()


@pytest.mark.parametrize('profile_steps,steps', [((0, 0), range(1, 4)),
                                                 ((2, 2), range(5, 7))])
def test_no_trace_when_off_or_resumed_past_the_window(tmp_path, profile_steps,
                                                      steps):
  window = profiling.ProfileWindow(profile_steps, str(tmp_path))
  assert not any(run_steps(window, steps).values())
  assert not traces(tmp_path)


def test_the_data_wait_is_waiting_over_wall_time(monkeypatch):
  now = [0.0]
  monkeypatch.setattr(profiling.time, 'perf_counter', lambda: now[0])
  wait = profiling.DataWait()
  for begin, end in ((1.0, 3.0), (4.0, 4.0)):
    now[0] = begin
    with wait.waiting():
      now[0] = end
  now[0] = 5.0
  assert wait.share() == pytest.approx(2 / 5)
  with wait.waiting():
    now[0] = 6.0
  now[0] = 10.0
  assert wait.share() == pytest.approx(1 / 5)  # since the previous share
