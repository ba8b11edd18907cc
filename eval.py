"""Multi-view evaluation of a trained STAT checkpoint.

  python eval.py --config=configs/k400.py:16 --workdir=runs/k400_16 \
      [--checkpoint=latest|best|STEP]

Writes <workdir>/eval_step<STEP>.json (+ per-video predictions beside it).

Multi-process (one process per host or GPU): run the same command in every
process; see stat_jax/distributed.py and the README's "Scale-out" (flags
--coordinator_address, --num_processes, --process_id; locally
`python -m stat_jax.launch --num_processes 2 -- eval.py ...`).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from stat_jax import cli, trainer
from stat_jax.startup import start_run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory to evaluate.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest',
                                  "'latest', 'best' or a step number.")
flags.mark_flags_as_required(['config', 'workdir'])


def evaluate() -> int:
  start_run(_CONFIG.value)
  trainer.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
  return 0


main = cli.script_main('eval.py', evaluate)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('eval.py'))
