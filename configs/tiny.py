"""A tiny STAT that builds and runs in seconds on a CPU (tests, smoke runs).

  python -m stat_jax.flops --config=configs/tiny.py

Same architecture family as the paper (all blocks, pooling and attention
paths exercised) at 8 frames of 32x32: the 3-layer stem gives 4 frames of
4x4 tokens, one block per stage. Its classes are those of the synthetic
motion set (stat_jax/data/synthetic.py), which the tests train it on.
"""

from stat_jax.data import synthetic
from stat_jax import defaults


def get_config(arg: str = ''):
  del arg
  config = defaults.base_config(num_frames=8,
                                num_classes=len(synthetic.CLASSES))
  config.data.dataset = 'synthetic_motion'
  config.data.reversed_classes = synthetic.REVERSED_CLASSES
  config.data.crop_size = 32
  config.data.eval_short_side = 32
  config.data.num_clips, config.data.num_crops = 2, 1
  config.data.randaugment_layers = 0
  config.data.random_erasing = 0.0
  config.data.repeated_augment = 1  # every clip of a batch its own video
  m = config.model
  m.stem_hidden = (8, 16)
  m.stage_depths = (1, 1, 1, 1)
  m.stage_dims = (16, 32, 64, 128)
  m.stage_heads = (1, 2, 2, 4)
  m.kv_stride = 4  # token grids 4 -> 2 -> 1 per stage; K/V 2x2 at every stage
  m.window = 3
  m.drop_path = 0.1
  m.dropout = 0.0
  config.batch_size = 4
  config.total_steps = 10
  config.log_every = 1
  config.attention_images = 0  # no capture program to compile in tests
  return config
