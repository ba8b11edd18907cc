"""MViT-B v1 on Kinetics-400 (Fan et al. 2021): the paper's baseline.

  python train.py --config=configs/mvit_b.py:16 --workdir=runs/mvit_b_16 \
      --config.data.train_spec=/data/k400/train.tfrecord@512 \
      --config.data.eval_spec=/data/k400/val.tfrecord@64

arg: 16 (MViT-B 16x4: 16 frames 4 apart, PySlowFast's
configs/Kinetics/MVIT_B_16x4_CONV.yaml) or 32 (MViT-B 32x3,
MVIT_B_32x3_CONV.yaml). The architecture is stat_jax/mvit.py with the
stage layout STAT uses (MVIT.DEPTH 16, DIM_MUL / HEAD_MUL at blocks 1, 3,
14, POOL_KVQ_KERNEL [3, 3, 3], POOL_KV_STRIDE_ADAPTIVE [1, 8, 8],
POOL_Q_STRIDE [1, 2, 2]); the recipe is configs/k400.py's, which is these
yamls', so that the two models train on the same pipeline. Test views:
5 clips x 1 crop (the paper's "x 1 x 5").

Start from public weights: `python -m stat_jax.deploy.import_torch` (README).
"""

from configs import k400

# MViT-B's clip: frames and the stride between them (DATA.NUM_FRAMES,
# DATA.SAMPLING_RATE).
FRAME_STRIDE = {16: 4, 32: 3}


def get_config(arg: str = '16'):
  if not arg.isdigit() or int(arg) not in FRAME_STRIDE:
    raise ValueError(f'configs/mvit_b.py:{arg}: the clip length must be one '
                     f'of {sorted(FRAME_STRIDE)} (MViT-B 16x4, 32x3)')
  config = k400.get_config(arg)  # MVIT.DROPPATH_RATE 0.2 at 16, 0.3 at 32
  config.model.arch = 'mvit'
  config.model.stem_layers = 1  # PATCH_KERNEL [3, 7, 7], PATCH_STRIDE [2, 4, 4]
  config.data.sampling = 'dense'
  config.data.frame_stride = FRAME_STRIDE[int(arg)]
  config.data.num_clips, config.data.num_crops = 5, 1
  config.attention_images = 0  # the attention maps are STA's
  return config
