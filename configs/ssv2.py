"""STAT on Something-Something v2 (paper Table 7), 174 classes.

  python train.py --config=configs/ssv2.py:16 --workdir=runs/ssv2_16 \
      --config.init_from=runs/k400_16 \
      --config.data.train_spec=/data/ssv2/train.tfrecord@256 \
      --config.data.eval_spec=/data/ssv2/val.tfrecord@32

arg: the clip length T, one of 16, 32, 64. The paper fine-tunes from
Kinetics-400 (Table 7, "Pre-train: K400"). Horizontal flip is off: in SSv2
left and right are part of the label. Test views: 1 clip x 3 crops.
"""

from stat_jax import defaults

NUM_CLASSES = 174
TRAIN_VIDEOS = 168_913


def get_config(arg: str = '16'):
  num_frames = defaults.clip_length(arg, 'configs/ssv2.py')
  config = defaults.base_config(num_frames, NUM_CLASSES)
  config.data.dataset = 'ssv2'
  config.data.flip = False
  config.data.num_clips, config.data.num_crops = 1, 3
  config.train_examples = TRAIN_VIDEOS
  config.num_epochs = 100
  config.model.drop_path = 0.3
  return config
