"""TFDS builder for the synthetic motion dataset (offline, no downloads).

  import stat_jax.data.synthetic_tfds  # registers 'synthetic_motion'
  ds = tfds.load('synthetic_motion', data_dir=DIR)          # 1000/200 x 32x64²
  ds = tfds.load('synthetic_motion/tiny', data_dir=DIR)     # 48/24 x 8x32²

Each example: video uint8 [T, S, S, 3] (JPEG frames), label (ClassLabel over
synthetic.CLASSES), id. Clips equal those of data.synthetic.generate with
seed 0.
"""

import dataclasses

import tensorflow_datasets as tfds

from stat_jax.data import synthetic


@dataclasses.dataclass
class SyntheticMotionConfig(tfds.core.BuilderConfig):
  num_train: int = 1000
  num_val: int = 200
  num_frames: int = 32
  size: int = 64


class SyntheticMotion(tfds.core.GeneratorBasedBuilder):
  """Clips whose classes differ only by motion, in time-reversed pairs."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [
      SyntheticMotionConfig(name='default'),
      SyntheticMotionConfig(name='tiny', num_train=48, num_val=24,
                            num_frames=8, size=32),
  ]

  # No downloads, so no checksums file. Overriding this also avoids TFDS's
  # code_path lookup, which needs the `importlib_resources` package.
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'video': tfds.features.Video(
                (cfg.num_frames, cfg.size, cfg.size, 3),
                encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=synthetic.CLASSES),
            'id': tfds.features.Text(),
        }),
        supervised_keys=('video', 'label'),
        description=synthetic.__doc__.split('\n')[0])

  def _split_generators(self, dl_manager):
    del dl_manager  # generated, nothing to download
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'val': self._generate_examples('val', cfg.num_val)}

  def _generate_examples(self, split, count):
    cfg = self.builder_config
    for index in range(count):
      label = synthetic.clip_label(index)
      key = f'{split}/{index:06d}'
      yield key, {'video': synthetic.render_clip(
          label, 0, split, index, cfg.num_frames, cfg.size),
                  'label': label, 'id': key}
