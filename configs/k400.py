"""STAT on Kinetics-400 (paper Table 6).

  python train.py --config=configs/k400.py:16 --workdir=runs/k400_16 \
      --config.data.train_spec=/data/k400/train.tfrecord@512 \
      --config.data.eval_spec=/data/k400/val.tfrecord@64

arg: the clip length T, one of 16, 32, 64 (window to = 3, 5, 7). Test views
follow the paper: 5 clips x 1 crop for T = 16 and 32, 3 x 3 for T = 64.
"""

from stat_jax import defaults

NUM_CLASSES = 400
TRAIN_VIDEOS = 240_000


def get_config(arg: str = '16'):
  num_frames = defaults.clip_length(arg, 'configs/k400.py')
  config = defaults.base_config(num_frames, NUM_CLASSES)
  config.data.dataset = 'kinetics400'
  config.train_examples = TRAIN_VIDEOS
  if num_frames == 64:
    config.data.num_clips, config.data.num_crops = 3, 3
  # MViT-B's stochastic depth: 0.2 at 16 frames, 0.3 for longer clips.
  config.model.drop_path = 0.2 if num_frames == 16 else 0.3
  return config
