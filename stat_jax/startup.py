"""What train.py and eval.py do before they train or evaluate."""

import jax
from absl import logging

from stat_jax.data import synthetic
from stat_jax import compile_cache, distributed
from stat_jax.checks.config import validate


def start_run(config) -> None:
  """Join the multi-process job if there is one, refuse a bad config, turn
  on the persistent compilation cache, and generate the synthetic data set
  when the config asks for it (stat_jax/data/synthetic.py: it fills in the data
  specs)."""
  logging.set_verbosity(logging.WARNING)  # orbax and clu are chatty at INFO
  distributed.initialize_from_flags()
  validate(config)
  compile_cache.enable(config)
  if synthetic.prepare(config.data) and jax.process_index() == 0:
    spec = config.data.synthetic
    print(f'Synthetic motion data: {spec.dir} ({spec.train_clips} train, '
          f'{spec.val_clips} val clips of {spec.frames}x{spec.size}x'
          f'{spec.size}).', flush=True)
