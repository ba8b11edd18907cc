"""Faults of the training loop and of checkpoints that must not lose work:
a crash while a checkpoint is being written, NaN states, corrupt checkpoints,
a resume under another config, unchecked config values, duplicated log
lines. The runs share one tiny config (tests/training_testlib.py's run_config),
so they share one compiled train step (checkpoint_every and eval_every are
not part of it). One run crashes at step 4 (its evaluation fails); its
checkpoints (2 and 4) and logged losses serve the other tests."""

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from stat_jax import checkpoint, preemption, storage, trainer
from stat_jax.checks import workdir as workdir_checks
from stat_jax.checks.config import ConfigError, check_batch_on_mesh, validate
from stat_jax.deploy import inference, predict
from stat_jax.checks.errors import UserError
from stat_jax.train_state import abstract_train_state, with_shardings
from conftest import ROOT
from training_testlib import run_config

STOP = 4  # here a checkpoint every 2, stopped at 4


def config_of(motion):
  return run_config(motion, checkpoint_every=2, eval_every=4)


def log_steps(workdir):
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    return [json.loads(line)['step'] for line in f]


def steps_on_disk(workdir):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.fixture(scope='module')
def crashed(motion, tmp_path_factory):
  """A run (a checkpoint every 2 steps, an evaluation every 4) whose
  evaluation at step 4 fails: {'workdir', 'error', 'on_disk': the
  checkpoints there when the error left, 'losses': the logged losses}."""

  def failing_evaluation(*args, **kwargs):
    raise OSError('eval disk gone')

  workdir = str(tmp_path_factory.mktemp('crashed'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, 'evaluate', failing_evaluation)
    try:
      trainer.train_and_evaluate(config_of(motion), workdir)
      error = None
    except OSError as raised:
      error = raised
  on_disk = steps_on_disk(workdir)
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    losses = {entry['step']: entry['loss'] for entry in map(json.loads, f)}
  return {'workdir': workdir, 'error': error, 'on_disk': on_disk,
          'losses': losses}


def copy_of(workdir, tmp_path):
  target = str(tmp_path / 'run')  # tmp_path: a folder that does not exist yet
  shutil.copytree(workdir, target)
  return target


# ------------------------------------------------ crash inside the loop ---

def test_a_crash_in_the_loop_keeps_the_checkpoint_being_written(crashed):
  assert 'eval disk gone' in str(crashed['error'])
  # The step whose evaluation failed is saved, and already whole when the
  # error left (the save had just started): no tmp folder of step 4.
  assert crashed['on_disk'] == ['2', '4']
  assert sorted(crashed['losses']) == [1, 2, 3, 4]


def test_inputs_are_checked_before_the_first_step(motion, tmp_path):
  missing = run_config(motion)
  missing.data.eval_spec = str(tmp_path / 'nowhere-*.tfrecord')
  with pytest.raises(UserError, match='eval_spec.*matches no file'):
    trainer.train_and_evaluate(missing, str(tmp_path / 'a'))
  empty_file = tmp_path / 'empty.tfrecord'
  empty_file.write_bytes(b'')
  empty = run_config(motion)
  empty.data.eval_spec = str(empty_file)
  with pytest.raises(UserError, match='eval_spec.*no records'):
    trainer.train_and_evaluate(empty, str(tmp_path / 'b'))
  assert not os.path.exists(tmp_path / 'a') and not os.path.exists(tmp_path / 'b')


def no_model(*args):
  raise AssertionError('the model was built before the workdir was checked')


def test_an_unwritable_workdir_is_refused_before_anything_compiles(
    motion, tmp_path, monkeypatch):
  monkeypatch.setattr(trainer, 'abstract_train_state', no_model)
  (tmp_path / 'a_file').write_text('')
  workdir = str(tmp_path / 'a_file' / 'run')  # no folder there, even for root
  with pytest.raises(UserError, match=re.escape(
      f'{workdir} is not writable (Not a directory); checkpoints')):
    trainer.train_and_evaluate(config_of(motion), workdir)


def test_eval_refuses_a_read_only_workdir_before_restoring(
    motion, tmp_path, monkeypatch, request):
  workdir = copy_of(request.getfixturevalue('crashed')['workdir'], tmp_path)

  def read_only(*args, **kwargs):  # what a read-only folder answers, to root too
    raise PermissionError(errno.EACCES, 'Permission denied')

  monkeypatch.setattr(storage.tempfile, 'mkstemp', read_only)
  monkeypatch.setattr(trainer, 'abstract_train_state', no_model)
  with pytest.raises(UserError, match=re.escape(
      f'{workdir} is not writable (Permission denied)')):
    trainer.evaluate_checkpoint(config_of(motion), workdir)


# ---------------------------------------------------------- NaN states ---

def test_a_non_finite_state_is_never_saved_nor_restored(motion, tmp_path, capfd):
  config = run_config(motion)
  good = {'w': jnp.ones(3), 'step': jnp.int32(1)}
  bad = {'w': jnp.array([1.0, jnp.inf, 0.0]), 'step': jnp.int32(2)}
  data_state = {'epoch': 0, 'position': 0}
  ckpt = checkpoint.Checkpointer(str(tmp_path), 3)
  ckpt.save(1, good, data_state, config)
  with pytest.raises(trainer.NonFiniteLoss,
                     match='after step 2 holds NaN/inf.*Last good checkpoint: step 1'):
    ckpt.save(2, bad, data_state, config)
  ckpt.wait()
  assert ckpt._manager.all_steps() == [1]
  # A poisoned checkpoint written by older code: skipped for the one before.
  monkey = checkpoint.all_finite
  checkpoint.all_finite = lambda tree: True
  try:
    ckpt.save(2, bad, data_state, config)
    ckpt.wait()
  finally:
    checkpoint.all_finite = monkey
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), good)
  step, state = ckpt.newest_whole(
      'latest', lambda s: ckpt.restore_state(s, abstract))
  assert step == 1 and np.all(np.asarray(state['w']) == 1)
  assert 'checkpoint step 2' in capfd.readouterr().err
  ckpt.close()


# -------------------------------------------------- corrupt checkpoints ---

def _corrupt(step_dir, kind):
  arrays = sorted(glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'),
                            recursive=True), key=os.path.getsize)
  if kind == 'truncated':
    with open(arrays[-1], 'r+b') as f:
      f.truncate(100)
  elif kind == 'zeros':  # the size kept, the bytes gone
    size = os.path.getsize(arrays[-1])
    with open(arrays[-1], 'wb') as f:
      f.write(bytes(size))
  elif kind == 'deleted':
    os.remove(arrays[-1])
  elif kind == 'empty':
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)
  elif kind == 'no_metadata':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))


def test_every_kind_of_corrupt_latest_falls_back_to_the_step_before(
    motion, crashed, tmp_path, capfd):
  config = run_config(motion)
  mesh = trainer.sharding.make_mesh(config)
  _, _, abstract, shardings = abstract_train_state(config, mesh)
  abstract = with_shardings(abstract, shardings)
  for kind in ('truncated', 'deleted', 'empty', 'no_metadata'):
    workdir = copy_of(crashed['workdir'], tmp_path / kind)
    _corrupt(os.path.join(workdir, 'checkpoints', '4'), kind)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), 1,
                                   read_only=True)
    capfd.readouterr()
    step, _ = ckpt.newest_whole('latest',
                                lambda s: ckpt.restore_state(s, abstract))
    assert step == 2, kind
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('warning: checkpoint step 4 '), err
    if kind == 'no_metadata':
      assert 'state/_METADATA is missing' in err[0]
    with pytest.raises(checkpoint.CorruptCheckpoint, match='checkpoint step 4'):
      ckpt.newest_whole(4, lambda s: ckpt.restore_state(s, abstract))
    ckpt.close()
  assert inference.restore(workdir).step == 2  # export's and predict's path


def test_train_and_eval_fall_back_from_a_corrupt_latest(
    motion, crashed, tmp_path, capfd):
  workdir = copy_of(crashed['workdir'], tmp_path)
  _corrupt(os.path.join(workdir, 'checkpoints', '4'), 'zeros')
  capfd.readouterr()
  report = trainer.evaluate_checkpoint(config_of(motion), workdir)
  assert report['checkpoint_step'] == 2
  err = capfd.readouterr().err
  assert len(err.splitlines()) < 10 and 'checkpoint step 4' in err  # no flood
  with open(os.path.join(workdir, 'train_log.jsonl'), 'a') as f:
    f.write('{"step": 5, "lo')  # a line cut short by a kill
  result = trainer.train_and_evaluate(config_of(motion), workdir,
                                      stop_after=STOP)
  err = capfd.readouterr().err
  assert len(err.splitlines()) < 50, err[-3000:]  # one warning, no flood
  assert 'warning: checkpoint step 4 ' in err
  # Exact resume from 2; the replayed steps 3 and 4 logged once.
  assert result['losses'] == {s: crashed['losses'][s] for s in (3, 4)}
  assert steps_on_disk(workdir) == ['2', '4', '4.corrupt']
  assert log_steps(workdir) == [1, 2, 3, 4]


# ------------------------------------------------------- pre-emption ---

class PreemptedAt:
  """A Preemption whose sync point is `step` (watch_preemption's)."""

  def __init__(self, step):
    self.step, self.signalled = step, False

  def reached(self, step):
    return step == self.step


def test_a_stop_on_an_eval_step_saves_it_and_skips_the_evaluation(
    motion, crashed, tmp_path, monkeypatch, capsys):
  workdir = copy_of(crashed['workdir'], tmp_path)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # resume at 2

  def no_evaluation(*args, **kwargs):
    raise AssertionError('a pre-empted step was evaluated')

  @contextlib.contextmanager
  def preempted_at_3():
    yield PreemptedAt(3)

  monkeypatch.setattr(trainer, 'evaluate', no_evaluation)
  monkeypatch.setattr(trainer, 'watch_preemption', preempted_at_3)
  config = run_config(motion, checkpoint_every=2, eval_every=3)
  result = trainer.train_and_evaluate(config, workdir)  # one step, 3
  assert result['preempted'] and result['eval'] is None
  assert steps_on_disk(workdir) == ['2', '3']
  assert 'Pre-empted at step 3: its evaluation is skipped' in (
      capsys.readouterr().out)


def test_only_a_missing_preemption_service_means_not_preempted(monkeypatch,
                                                               capsys):
  def failing_query(step):
    raise RuntimeError('coordination service unreachable')

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils,
                      'reached_preemption_sync_point', failing_query)
  with pytest.raises(RuntimeError, match='coordination service unreachable'):
    preemption.Preemption().reached(3)
  monkeypatch.setattr(preemption, 'service_enabled', lambda: False)
  watcher = preemption.Preemption()
  assert not watcher.reached(3) and not watcher.reached(4)
  err = capsys.readouterr().err
  assert err.count('jax_enable_preemption_service is off') == 1


# ------------------------------------------------- resume, other config ---

def test_a_resume_under_another_model_is_refused_naming_the_keys(
    motion, crashed, tmp_path):
  workdir = copy_of(crashed['workdir'], tmp_path)
  config = run_config(motion, **{'model.attention': 'ca', 'model.window': 5,
                                 'total_steps': 9, 'eval_every': 2,
                                 'checkpoint_every': 2})
  with pytest.raises(UserError, match=r"model.attention: 'ca\+sa\+la' -> 'ca'.*"
                     r'model.window: 3 -> 5.*resume_with_changed_config'):
    trainer.train_and_evaluate(config, workdir)
  assert steps_on_disk(workdir) == ['2', '4']


def test_run_control_keys_may_change_and_data_keys_may_not(motion):
  saved = json.loads(run_config(motion).to_json())
  config = run_config(motion, total_steps=100, eval_every=7, log_every=3,
                      checkpoint_every=9, keep_checkpoints=1)
  config.data.eval_batch_size, config.mesh.fsdp = 2, 2
  assert workdir_checks.changed_keys(saved, config) == {}
  config.data.train_spec = motion['train'] + ',' + motion['train']
  config.optimizer.base_lr = 1.0
  assert set(workdir_checks.changed_keys(saved, config)) == {
      'data.train_spec', 'optimizer.base_lr'}
  config.data.allow_data_change = True  # the data side checks the records
  assert set(workdir_checks.changed_keys(saved, config)) == {'optimizer.base_lr'}
  config.resume_with_changed_config = True
  assert workdir_checks.check_resume(saved, config, 3, 'x') == {
      'optimizer.base_lr': (saved['optimizer']['base_lr'], 1.0)}


# ------------------------------------------------------ unchecked values ---

@pytest.mark.parametrize('key, value, message', [
    ('eval_every', 0, 'eval_every = 0'),
    ('checkpoint_every', 0, 'checkpoint_every = 0'),
    ('log_every', -1, 'log_every = -1'),
    ('total_steps', -5, 'total_steps = -5'),
    ('keep_checkpoints', 0, 'keep_checkpoints = 0'),
    ('optimizer.base_lr', -1e-3, 'optimizer.base_lr = -0.001'),
    ('optimizer.min_lr', -1.0, 'optimizer.min_lr = -1.0'),
    ('optimizer.grad_clip', 0.0, 'optimizer.grad_clip = 0.0'),
    ('batch_size', 1, 'batch_size = 1: holds 1 video .*collective permute'),
    ('grad_reduce_dtype', 'float16', "grad_reduce_dtype = 'float16'"),
])
def test_bad_run_values_are_refused(motion, key, value, message):
  with pytest.raises(ConfigError, match=message):
    validate(run_config(motion, **{key: value}))


def test_what_the_mesh_asks_of_the_batch_is_checked_before_compiling(motion):
  config = run_config(motion, batch_size=6, grad_accum_steps=4)
  mesh = trainer.sharding.make_mesh(config)  # one device
  with pytest.raises(UserError, match='grad_accum_steps=4 does not divide the '
                     '6 clips of each of the 1 devices'):
    check_batch_on_mesh(config, mesh)
  config = run_config(motion, batch_size=6, **{'data.repeated_augment': 4})
  with pytest.raises(UserError, match='each device holds 6 clips and a video '
                     'gives data.repeated_augment = 4'):
    check_batch_on_mesh(config, mesh)


def test_predict_refuses_a_negative_top_k():
  with pytest.raises(app.UsageError, match='top_k'):
    predict.main(['--workdir=nowhere', '--top_k=-2', 'a.mp4'])


CLI_SCRIPT = """
from absl import app
from ml_collections import config_flags
from stat_jax import cli
config_flags.DEFINE_config_file('config', None, 'Experiment config.')
app.run(lambda argv: 0, flags_parser=cli.flags_parser('train.py'))
"""


def test_an_unknown_config_key_on_the_command_line_is_one_line(tmp_path):
  # train.py's parser (cli.flags_parser) with a config file that loads fast
  config_file = tmp_path / 'small.py'
  config_file.write_text(
      'import ml_collections\n'
      'def get_config():\n'
      '  return ml_collections.ConfigDict({"model": {"window": 3}})\n')
  result = subprocess.run(
      [sys.executable, '-c', CLI_SCRIPT, f'--config={config_file}',
       '--config.model.windw=3'], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 1
  assert result.stderr == ("train.py: unknown config key 'windw' Did you mean "
                           '"window" instead of "windw"?\n')
