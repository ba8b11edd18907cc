"""Refusals of the run directory: it must be writable, and a run resumes
only under the config its checkpoint was trained with. The third group of
checks (stat_jax/checks/__init__.py).

Every checkpoint stores its run's config (stat_jax/checkpoint.py). Resuming
compares it with the config of the new run: a change to the model, the
data, the training recipe or the seed would silently continue the old
parameters under another definition and then save them as the new one, so
it is refused with the differing keys named, unless
`config.resume_with_changed_config` is True (a change on purpose, e.g. a
lower learning rate after a NaN).

RUN_CONTROL_KEYS may always differ: how long and how often (total steps,
logging / eval / checkpoint frequencies), how evaluation is done, where and
how the computation runs (mesh, attention / conv implementations, remat,
the micro-batching of grad_accum_steps), and the data side's own
run-control knobs. The computation keys train the same model by the same
recipe, with numbers equal up to rounding, with one exception: mixup pairs
the clips each device holds, so a change of mesh pairs other clips (drawn
from the same distribution). Keys that only one of the two configs has
(added to stat_jax/defaults.py since the checkpoint) are not compared. A
new key of stat_jax/defaults.py is compared unless it is listed here: add
it when changing it mid-run cannot change what is trained.
"""

import json

import ml_collections
import tensorflow as tf

from stat_jax import defaults, storage
from stat_jax.checks.errors import UserError

# Exact keys, or prefixes ending in '.', that may differ on resume.
RUN_CONTROL_KEYS = (
    # how long, how often
    'total_steps', 'num_epochs', 'train_examples', 'log_every', 'eval_every',
    'checkpoint_every', 'keep_checkpoints', 'init_from',
    'resume_with_changed_config', 'compilation_cache_dir', 'profile_steps',
    # where and how the computation runs
    'mesh.', 'remat', 'grad_accum_steps', 'grad_reduce_dtype',
    'model.attention_impl',
    'model.conv_impl', 'model.head_layout',
    # evaluation and what it writes
    'attention_images', 'data.eval_spec', 'data.eval_short_side', 'data.num_clips',
    'data.num_crops', 'data.eval_batch_size', 'data.reversed_classes',
    # input pipeline run control (the data side's own checks)
    'data.num_parallel_calls', 'data.max_consecutive_skips',
    'data.skip_warning_fraction', 'data.allow_data_change', 'data.synthetic.',
)
# May differ when data.allow_data_change is set (the data side then checks
# the records themselves: stat_jax/data/train_pipeline.py).
DATA_CHANGE_KEYS = ('data.train_spec',)


def _free(key: str, keys) -> bool:
  return any(key == k or (k.endswith('.') and key.startswith(k)) for k in keys)


def changed_keys(saved: dict, config: ml_collections.ConfigDict) -> dict:
  """{key: (saved value, new value)} of the compared keys that differ."""
  new = defaults.flat_keys(json.loads(config.to_json()))  # tuples -> lists, as saved
  old = defaults.flat_keys(json.loads(json.dumps(saved)))
  free = RUN_CONTROL_KEYS
  if config.data.get('allow_data_change', False):
    free += DATA_CHANGE_KEYS
  return {key: (old[key], new[key]) for key in sorted(old.keys() & new.keys())
          if old[key] != new[key] and not _free(key, free)}


def check_resume(saved: dict, config: ml_collections.ConfigDict,
                 step: int, directory: str) -> dict:
  """Refuse (UserError) to resume checkpoint `step` under a config whose
  model / data / recipe keys differ from the `saved` one, unless
  config.resume_with_changed_config; the differing keys either way."""
  changed = changed_keys(saved, config)
  if changed and not config.get('resume_with_changed_config', False):
    listed = ', '.join(f'{key}: {old!r} -> {new!r}'
                       for key, (old, new) in list(changed.items())[:8])
    more = f' (and {len(changed) - 8} more)' if len(changed) > 8 else ''
    raise UserError(
        f'checkpoint step {step} in {directory} was trained with another '
        f'config: {listed}{more}. Use another --workdir, or pass '
        '--config.resume_with_changed_config=True to resume it anyway')
  return changed


def check_writable(directory: str) -> None:
  """Files can be created in `directory` (made if missing), where a run
  writes its checkpoints, logs and reports. Tried with a probe file, created
  and removed: the permission bits that os.access reads say yes to root, a
  read-only mount or a network file system may say otherwise, and a bucket
  answers for its own permissions (a missing bucket, missing credentials
  and a denied write all fail here, before anything compiles)."""
  try:
    storage.write_probe(directory)
  except (OSError, tf.errors.OpError) as error:
    raise UserError(f'{directory} is not writable ({storage.reason(error)});'
                    ' checkpoints, logs and reports are written there: give '
                    'a --workdir you can write to') from error
