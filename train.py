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

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from stat_jax import cli, trainer
from stat_jax.startup import start_run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, '
                               'TensorBoard logs, reports).')
flags.mark_flags_as_required(['config', 'workdir'])


def train() -> int:
  start_run(_CONFIG.value)
  result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  # Pre-empted: saved, but not finished (the shell's code for SIGTERM).
  return 128 + signal.SIGTERM if result['preempted'] else 0


main = cli.script_main('train.py', train, user_errors=(trainer.NonFiniteLoss,))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('train.py'))
