"""Train STAT; restarting the same command resumes from the latest checkpoint.

  python train.py --config=configs/k400.py:16 --workdir=runs/k400_16 \
      [--config.batch_size=128 --config.model.window=5 ...]

Multi-process (one process per host or GPU): run the same command in every
process; see stat_jax/distributed.py and the README's "Scale-out" (flags
--coordinator_address, --num_processes, --process_id; locally
`python -m stat_jax.launch --num_processes 2 -- train.py ...`).

SIGTERM (a pre-emption) ends the run after the current step with a
checkpoint, exit status 143; the same command resumes it.
"""

import os
import signal
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from stat_jax import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, '
                               'TensorBoard logs, reports).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax and clu are chatty at INFO
  try:
    distributed.initialize_from_flags()
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (trainer.NonFiniteLoss, ValueError, FileNotFoundError) as error:
    print(f'train.py: {error}', file=sys.stderr)
    return 1
  # Pre-empted: saved, but not finished (the shell's code for SIGTERM).
  return 128 + signal.SIGTERM if result['preempted'] else 0


if __name__ == '__main__':
  app.run(main)
