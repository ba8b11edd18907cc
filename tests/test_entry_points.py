"""train.py / eval.py report errors meant for the user in one line and let
any other exception (a bug) raise with its traceback; a pre-empted run
exits with SIGTERM's status."""

import signal
import subprocess
import sys

import pytest

from conftest import ROOT

# train.py's main under absl, once per kind in argv[2:], with
# trainer.train_and_evaluate raising that kind of error or, 'preempted',
# returning as a SIGTERM makes it. A user error or the pre-emption ends
# app.run with SystemExit, caught here; the bug, last, leaves the process
# uncaught.
FAKE_TRAIN = r'''
import sys
from absl import app
from stat_jax import trainer
from stat_jax.checks.errors import UserError
import train

workdir, kinds = sys.argv[1], sys.argv[2:]
for kind in kinds:
  def fake_run(config, workdir, kind=kind):
    if kind == 'preempted':
      return {'preempted': True}
    raise {'bug': RuntimeError('a bug'), 'user': UserError('a bad input'),
           'nan': trainer.NonFiniteLoss('loss is nan')}[kind]
  trainer.train_and_evaluate = fake_run
  sys.argv = ['train.py', '--config=configs/tiny.py', '--workdir=' + workdir]
  print(f'== {kind}', file=sys.stderr, flush=True)
  try:
    app.run(train.main)
  except SystemExit as exit:
    print(f'== status {exit.code}', file=sys.stderr, flush=True)
'''


@pytest.fixture(scope='module')
def stderr_of(tmp_path_factory) -> dict:
  """{kind: (its stderr, its exit status)} of FAKE_TRAIN on 'user',
  'nan', 'preempted', 'bug'."""
  result = subprocess.run(
      [sys.executable, '-c', FAKE_TRAIN,
       str(tmp_path_factory.mktemp('run')), 'user', 'nan', 'preempted', 'bug'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  stderr, kind = {}, None
  for part in result.stderr.split('== ')[1:]:
    if part.startswith('status '):  # the last kind exited through SystemExit
      stderr[kind] = stderr[kind][0], int(part.split()[1])
    else:  # a kind, ended by the uncaught exception unless a status follows
      kind, _, text = part.partition('\n')
      stderr[kind] = text, result.returncode
  return stderr


def test_an_unexpected_error_keeps_its_traceback(stderr_of):
  text, status = stderr_of['bug']
  assert status == 1
  assert 'Traceback (most recent call last)' in text
  assert 'RuntimeError: a bug' in text


@pytest.mark.parametrize('kind,message', [('user', 'a bad input'),
                                          ('nan', 'loss is nan')])
def test_an_error_meant_for_the_user_is_one_line(stderr_of, kind, message):
  text, status = stderr_of[kind]
  assert status == 1
  assert 'Traceback' not in text
  assert f'train.py: {message}\n' in text


def test_a_preempted_run_exits_with_the_status_of_sigterm(stderr_of):
  text, status = stderr_of['preempted']
  assert status == 128 + signal.SIGTERM and 'Traceback' not in text
