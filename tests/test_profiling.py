"""stat_jax/profiling.py: the profiler window traces exactly its steps into
the layout TensorBoard's profile plugin reads, and the data wait share is
waiting time over wall time, by a clock set by hand; a training run shows
both (progress line, TensorBoard, trace)."""

import glob
import os
import re
import time

import jax
import jax.numpy as jnp
import pytest
import tensorflow as tf

import training_testlib
from stat_jax import profiling, sharding, trainer


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


@pytest.mark.ci_extra  # a training run: too slow for the README test command
def test_a_run_reports_its_data_wait_and_traces_its_window(
    motion, tmp_path, capsys, monkeypatch):
  """A tiny run whose batches take 0.2 s to come and whose step is
  instant: the progress lines and TensorBoard give the same data wait,
  most of the first step's time; steps 2-3 are traced."""
  config = training_testlib.run_config(motion, total_steps=4,
                                       checkpoint_every=1000,
                                       profile_steps=(2, 2))
  config.data.eval_spec = ''
  training_testlib.instant_state_and_step(monkeypatch)
  global_batch = sharding.global_batch

  def slow_batch(batch, mesh):
    time.sleep(0.2)
    return global_batch(batch, mesh)

  monkeypatch.setattr(sharding, 'global_batch', slow_batch)
  trainer.train_and_evaluate(config, str(tmp_path))
  out = capsys.readouterr().out
  waits = [int(share) for share in re.findall(r'\| data wait (\d+)%', out)]
  # Later steps also hold the trace's start and stop, and the last save.
  assert len(waits) == 4 and waits[0] >= 50 and max(waits) <= 100, out
  logged = tensorboard_scalars(tmp_path, 'data_wait_share')
  assert sorted(logged) == [1, 2, 3, 4]
  assert [round(100 * logged[step]) for step in (1, 2, 3, 4)] == waits
  assert f'Profile of steps 2-3: {tmp_path}/tensorboard/plugins/profile' in out
  assert len(traces(tmp_path)) == 1


def tensorboard_scalars(workdir, tag: str) -> dict:
  """{step: value} of a scalar in the run's TensorBoard event files."""
  values = {}
  for events in glob.glob(os.path.join(workdir, 'tensorboard', 'events*')):
    for event in tf.compat.v1.train.summary_iterator(events):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values
