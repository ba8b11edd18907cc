"""Exact resume: after a stop, a SIGKILL, a SIGTERM (pre-emption); and
the checkpoints a run leaves (eval.py's restore, init_from)."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import ROOT
from stat_jax import trainer
from stat_jax.train_state import ModelParts
from stat_jax.transfer import load_pretrained
from training_testlib import STEPS, read_loss_log, run_config


def params_of(result):
  return jax.tree.leaves(jax.device_get(result['state'].params))


@pytest.fixture(scope='module')
def straight(motion, tmp_path_factory):
  """The tiny run of run_config(motion) without a stop (the reference of
  the resume tests, the source of init_from): train_and_evaluate's result
  plus its 'workdir'."""
  workdir = str(tmp_path_factory.mktemp('straight'))
  return dict(trainer.train_and_evaluate(run_config(motion), workdir),
              workdir=workdir)


def train_command(motion, workdir):
  """train.py on the tiny config and the motion set, logging every step."""
  return [sys.executable, 'train.py', '--config=configs/tiny.py',
          f'--workdir={workdir}', f'--config.total_steps={STEPS}',
          '--config.checkpoint_every=3', '--config.eval_every=1000',
          '--config.log_every=1',
          f'--config.data.train_spec={motion["train"]}',
          f'--config.data.eval_spec={motion["val"]}',
          f'--config.data.label_map={motion["label_map"]}',
          '--config.data.eval_batch_size=4']


# A bound against a hang only: the subprocess compiles first, and at XLA's
# own flags (STAT_JAX_TESTS_AS_RUN) on a busy machine that takes minutes.
PATIENCE_S = 600


def wait_for(condition, process, seconds=PATIENCE_S):
  deadline = time.time() + seconds
  while not condition():
    assert time.time() < deadline and process.poll() is None
    time.sleep(0.05)


def log_lines(workdir) -> int:
  path = os.path.join(workdir, 'train_log.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return len(f.readlines())


def sigterm_once_logged(workdir, lines: int) -> threading.Thread:
  """A thread that sends this process SIGTERM once train_log.jsonl of
  `workdir` holds more than `lines` lines (a step trained after a resume)."""
  def watch():
    deadline = time.time() + PATIENCE_S
    while log_lines(workdir) <= lines and time.time() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


@pytest.fixture(scope='module')
def killed_then_preempted(motion, tmp_path_factory):
  """One workdir through the faults a job meets: train.py SIGKILLed after
  its checkpoint 3; rerun in this process and SIGTERMed once it logged a
  step (train.py's exit status for it: test_entry_points.py); resumed to
  the end. What each phase left."""
  workdir = str(tmp_path_factory.mktemp('killed_then_preempted'))
  killed = subprocess.Popen(train_command(motion, workdir), cwd=ROOT,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  wait_for(lambda: os.path.isdir(os.path.join(workdir, 'checkpoints', '3')),
           killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  # The run's handler is in place while it trains; a signal that came after
  # it must not end the test process.
  outside = signal.signal(signal.SIGTERM, lambda signum, frame: None)
  try:
    signaller = sigterm_once_logged(workdir, log_lines(workdir))
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
      preempted = trainer.train_and_evaluate(run_config(motion), workdir)
    signaller.join()
  finally:
    signal.signal(signal.SIGTERM, outside)
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                 if d.isdigit())
  resumed = trainer.train_and_evaluate(run_config(motion), workdir)
  return {'killed_status': killed.returncode,
          'preempted': preempted['preempted'],
          'preempted_output': output.getvalue(), 'saved_when_preempted': saved,
          'resumed_losses': resumed['losses'], 'params': params_of(resumed),
          'losses': read_loss_log(workdir)}


def test_sigkill_then_rerun_gives_the_same_losses(killed_then_preempted,
                                                  straight):
  run = killed_then_preempted
  assert run['killed_status'] == -signal.SIGKILL
  assert 'Resuming from step' in run['preempted_output']
  assert run['losses'] == straight['losses']


def test_sigterm_saves_the_current_step_and_a_rerun_resumes(
    killed_then_preempted, straight):
  run = killed_then_preempted
  output = run['preempted_output']
  assert run['preempted'], output
  assert 'Pre-empted (SIGTERM) after step' in output
  stopped = int(output.split('Pre-empted (SIGTERM) after step ')[1].split(':')[0])
  assert stopped < STEPS
  # Saved where it stopped, not only at a multiple of checkpoint_every.
  assert run['saved_when_preempted'][-1] == stopped
  assert sorted(run['resumed_losses']) == list(range(stopped + 1, STEPS + 1))
  assert run['losses'] == straight['losses']  # bit for bit
  for resumed, reference in zip(run['params'], params_of(straight)):
    np.testing.assert_array_equal(resumed, reference)


def test_init_from_reinitialises_a_head_of_another_size(motion, straight):
  source = run_config(motion)
  # eval.py's path: restore the best checkpoint (the one evaluated, at the
  # last step) and evaluate every video once.
  report = trainer.evaluate_checkpoint(source, straight['workdir'], 'best')
  assert report['checkpoint_step'] == STEPS and report['num_videos'] == 7
  assert report['top1'] == straight['eval']['top1']
  assert os.path.exists(os.path.join(straight['workdir'],
                                     f'eval_step{STEPS}.json'))
  with pytest.raises(FileNotFoundError,  # 3 kept (config.keep_checkpoints)
                     match=r"no checkpoint '5'.*steps: \[6, 9, 12\]"):
    trainer.evaluate_checkpoint(source, straight['workdir'], '5')

  target = run_config(motion)
  target.model.num_classes = 5
  parts = ModelParts(target)
  fresh = jax.jit(lambda: parts.init_params(1))()
  messages = []
  loaded = load_pretrained(straight['workdir'], fresh, log=messages.append)
  assert 'copied 90, adapted 0, new 2, unused 2' in messages[0]
  assert [line.split() for line in messages[0].splitlines()[1:]
          if line.split()[0] == 'new'] == [['new', 'head.bias'],
                                            ['new', 'head.kernel']]
  np.testing.assert_array_equal(loaded['head']['kernel'][...],
                                fresh['head']['kernel'][...])
  np.testing.assert_array_equal(
      loaded['blocks'][0]['attn']['qkv']['kernel'][...],
      straight['state'].params['blocks'][0]['attn']['qkv']['kernel'][...])
