"""train.py / eval.py report errors meant for the user in one line and let
any other exception (a bug) raise with its traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py's main under absl, with trainer.train_and_evaluate raising argv[1].
TRAIN_RAISING = r'''
import sys
from absl import app
from stat_jax import trainer
from stat_jax.errors import UserError
import train

kind, workdir = sys.argv[1:]

def raising(config, workdir):
  raise {'bug': RuntimeError('a bug'), 'user': UserError('a bad input'),
         'nan': trainer.NonFiniteLoss('loss is nan')}[kind]

trainer.train_and_evaluate = raising
sys.argv = ['train.py', '--config=configs/tiny.py', '--workdir=' + workdir]
app.run(train.main)
'''


def run_train_raising(kind, workdir):
  return subprocess.run([sys.executable, '-c', TRAIN_RAISING, kind,
                         str(workdir)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_an_unexpected_error_keeps_its_traceback(tmp_path):
  result = run_train_raising('bug', tmp_path)
  assert result.returncode == 1
  assert 'Traceback (most recent call last)' in result.stderr
  assert 'RuntimeError: a bug' in result.stderr


@pytest.mark.parametrize('kind,message', [('user', 'a bad input'),
                                          ('nan', 'loss is nan')])
def test_an_error_meant_for_the_user_is_one_line(tmp_path, kind, message):
  result = run_train_raising(kind, tmp_path)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert f'train.py: {message}\n' in result.stderr
