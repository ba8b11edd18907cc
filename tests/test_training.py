"""The training loop: learning, accumulation, evaluation, guards (meshes of
several devices and processes: test_distributed.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stat_jax.data import eval_pipeline, synthetic, train_pipeline
from stat_jax import augment_device, optim, trainer
from stat_jax.checks.config import ConfigError
from stat_jax.train_state import ModelParts, init_train_state
from stat_jax.train_step import make_eval_step, make_train_step
from training_testlib import fixed_batch, no_randomness, run_config


@pytest.fixture(scope='module')
def memorising(motion) -> dict:
  """The train step on one fixed batch, without randomness or warm-up, at a
  learning rate that memorises the batch in a few steps: its 'config',
  'parts', 'tx', initial 'state', jitted 'step' and 'batch'."""
  config = no_randomness(run_config(motion, total_steps=50))
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.base_lr = 0.5  # x 4/512 -> 4e-3
  parts, tx = ModelParts(config), optim.make_optimizer(config)
  return {'config': config, 'parts': parts, 'tx': tx,
          'state': jax.jit(lambda: init_train_state(parts, config.seed, tx))(),
          'step': jax.jit(make_train_step(config, parts, tx)),
          'batch': fixed_batch(config)}


def test_loss_decreases_on_a_fixed_batch(memorising):
  state, losses = memorising['state'], []
  for _ in range(8):
    state, metrics = memorising['step'](state, memorising['batch'])
    losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.75 * losses[0]  # memorising the batch
  assert int(state.step) == 8


def test_gradient_accumulation_equals_the_full_batch(memorising):
  state, batch = memorising['state'], memorising['batch']
  full, full_metrics = memorising['step'](state, batch)
  config = memorising['config'].copy_and_resolve_references()
  config.grad_accum_steps = 4  # micro-batches of one clip
  micro, micro_metrics = jax.jit(make_train_step(
      config, memorising['parts'], memorising['tx']))(state, batch)
  np.testing.assert_allclose(micro_metrics['loss'], full_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(micro_metrics['grad_norm'], full_metrics['grad_norm'],
                             rtol=1e-4)
  # After one step AdamW's first moments are a tenth of the gradients (the
  # parameters are not compared: Adam's update of a gradient near zero is
  # its sign, which rounding may flip).
  for a, b in zip(jax.tree.leaves(full.opt_state),
                  jax.tree.leaves(micro.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_evaluation_counts_every_video_once_and_averages_views(motion):
  config = run_config(motion)
  config.data.num_clips, config.data.num_crops = 2, 1  # 7 videos, batches of 4
  # The time-reversal score follows data.reversed_classes (set by tiny.py),
  # whatever the dataset is called.
  config.data.dataset = 'another_dataset'
  parts = ModelParts(config)
  params = jax.jit(lambda: parts.init_params(0))()
  eval_step = jax.jit(make_eval_step(parts, config.data))
  mesh = trainer.sharding.make_mesh(config)
  result = trainer.evaluate(config, eval_step, params, mesh)
  assert result['num_videos'] == 7 and result['num_views'] == 14
  assert result['skipped'] == 0
  # Reference: every video's views through the model, softmax averaged; and
  # played backwards, scored against the reversed class.
  views, reversed_views = {}, {}
  for batch in eval_pipeline.make_eval_iterator(config):
    probs = np.asarray(eval_step(params, batch['video']))
    reversed_probs = np.asarray(eval_step(params, batch['video'][:, ::-1]))
    for p, q, vid, label, valid in zip(probs, reversed_probs,
                                       batch['video_id'], batch['label'],
                                       batch['mask']):
      if valid:
        views.setdefault(int(vid), (int(label), []))[1].append(p)
        reversed_views.setdefault(
            int(vid), (synthetic.reverse_class(int(label)), []))[1].append(q)
  accuracy = lambda videos: np.mean([np.argmax(np.mean(p, 0)) == label
                                     for label, p in videos.values()])
  assert result['top1'] == pytest.approx(accuracy(views))
  assert result['time_reversed_top1'] == pytest.approx(
      accuracy(reversed_views))
  config.data.reversed_classes = ()  # off
  assert 'time_reversed_top1' not in trainer.evaluate(config, eval_step,
                                                      params, mesh)


def test_nan_loss_stops_naming_the_step(motion, tmp_path, monkeypatch):
  real = train_pipeline.make_train_iterator
  real_augment = augment_device.augment_batch
  poison = np.uint32(2**32 - 1)  # key data that marks a clip for NaN pixels

  def augment_or_nan(video, key, data):  # uint8 clips cannot hold a NaN
    marked = (key == poison).all(axis=1)[:, None, None, None, None]
    return jnp.where(marked, jnp.nan, real_augment(video, key, data))

  class Poisoned:
    """The real iterator, whose 5th batch gets NaN pixels on the device."""

    def __init__(self, *args, **kwargs):
      self._inner, self._count = real(*args, **kwargs), 0

    def __next__(self):
      batch = next(self._inner)
      self._count += 1
      if self._count == 5:
        batch = dict(batch, key=np.full_like(batch['key'], poison))
      return batch

    def __getattr__(self, name):  # the rest of the real iterator
      return getattr(self._inner, name)

  monkeypatch.setattr(train_pipeline, 'make_train_iterator', Poisoned)
  monkeypatch.setattr(augment_device, 'augment_batch', augment_or_nan)
  with pytest.raises(trainer.NonFiniteLoss,
                     match=r'at step 5.*Last good checkpoint: step 3'):
    trainer.train_and_evaluate(run_config(motion), str(tmp_path))


def test_bad_config_is_refused_before_anything_runs(motion, tmp_path):
  config = run_config(motion, **{'model.window': 4})
  with pytest.raises(ConfigError, match='model.window = 4'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
  # A key that does not exist, on train.py's command line: test_faults_training.
