"""What the training tests share: the tiny run on the motion set, batches
without the pipeline, the loss log."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from stat_jax import train_step, trainer

STEPS = 12  # of the runs here; long enough that a SIGTERM lands mid-run


def run_config(motion, **overrides):
  config = tiny.get_config()
  config.data.train_spec, config.data.eval_spec = motion['train'], motion['val']
  config.data.label_map = motion['label_map']
  config.data.eval_batch_size = 4
  config.total_steps = STEPS
  config.checkpoint_every = 3
  config.eval_every = 1000
  config.log_every = 1
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


def no_randomness(config):
  """No mixup, dropout or drop path: steps depend on the batch only."""
  config.mixup.mixup_alpha = config.mixup.cutmix_alpha = 0.0
  config.model.drop_path = config.model.dropout = 0.0
  return config


def fixed_batch(config, seed=0):
  """A pipeline-like batch: uint8 clips, per-clip key data, labels."""
  data, size = config.data, config.batch_size
  rng = np.random.default_rng(seed)
  return {'video': rng.integers(0, 256, (size, data.num_frames, data.crop_size,
                                         data.crop_size, 3), np.uint8),
          'key': rng.integers(0, 2**32, (size, 2), np.uint32),
          'label': rng.integers(0, config.model.num_classes, size, np.int32)}


def read_loss_log(workdir):
  losses = {}
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    for line in f:
      entry = json.loads(line)
      losses[entry['step']] = entry['loss']  # a resumed step: the latest
  return losses


def instant_state_and_step(monkeypatch):
  """For tests of the training loop, not of learning: a train state of
  zeros and a step (loss from the batch, no gradients) that compile in no
  time."""
  abstract, built = trainer.abstract_train_state, []
  monkeypatch.setattr(trainer, 'abstract_train_state',
                      lambda *a: built.append(abstract(*a)) or built[0])
  monkeypatch.setattr(trainer, 'init_train_state', lambda *_: jax.tree.map(
      lambda a: jnp.zeros(a.shape, a.dtype), built[0][2]))
  monkeypatch.setattr(train_step, 'make_train_step', lambda *_: lambda state, b: (
      state.replace(step=state.step + 1),
      {'loss': b['video'].mean() + 1.0, 'grad_norm': b['label'].sum() * 0.0}))
