"""The demo: a small STAT learns the synthetic motion dataset on a CPU.

  python train.py --config=configs/demo.py --workdir=runs/demo

If the dataset is not in data.synthetic.dir it is generated first (about
20 seconds). Classes differ only by motion and come in time-reversed pairs
(stat_jax/data/synthetic.py), so a high score needs temporal order; the final
evaluation also scores val clips played backwards against the reversed
class. Horizontal flip is off: left/right and clockwise/counter-clockwise
are labels.

The recipe: 16-frame 32x32 clips read whole (no crop, no RandAugment, no
mixup), 1000 steps of 32 at a peak LR of 2e-4. A higher peak LR can leave
the loss stuck at ln(12) (chance) from the start; a lower one learns more
slowly. The run's time and accuracy, and the learning rates tried, are in
benchmarks/RESULTS.md ("The demo").
"""

from stat_jax import defaults
from stat_jax.data import synthetic


def get_config(arg: str = ''):
  del arg
  config = defaults.base_config(num_frames=16, num_classes=len(synthetic.CLASSES))
  d = config.data
  d.dataset = 'synthetic_motion'
  d.reversed_classes = synthetic.REVERSED_CLASSES  # the time-reversal score
  d.synthetic.generate = True
  d.synthetic.dir = 'cache/synthetic_motion'
  d.synthetic.train_clips = 4800
  d.synthetic.val_clips = 480
  d.synthetic.frames = 16
  d.synthetic.size = 32
  d.crop_size = 32
  d.eval_short_side = 32
  d.area_range = (1.0, 1.0)
  d.flip = False
  d.randaugment_layers = 0
  d.random_erasing = 0.0
  d.repeated_augment = 1  # every clip of a batch its own video
  d.num_clips, d.num_crops = 1, 1
  d.eval_batch_size = 48

  m = config.model
  m.stem_hidden = (16, 32)
  m.stage_depths = (1, 1, 2, 1)
  m.stage_dims = (32, 64, 128, 256)
  m.stage_heads = (1, 2, 4, 8)
  # No K/V pooling: on a 4x4 token grid MViT's stride-8 pooling would leave
  # one K/V token that sees only the top-left corner (kernel 3, pad 1).
  m.kv_stride = 1
  m.sa_pool = 1
  m.drop_path = 0.0
  m.dropout = 0.0

  config.batch_size = 32
  config.total_steps = 1000
  config.train_examples = d.synthetic.train_clips
  config.optimizer.base_lr = 3.2e-3  # x 32/512 -> 2e-4 peak
  config.optimizer.min_lr = 3.2e-5
  config.optimizer.warmup_epochs = 1.0
  config.mixup.mixup_alpha = 0.0
  config.mixup.cutmix_alpha = 0.0
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  return config
