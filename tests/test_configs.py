"""Experiment configs: the paper's variants, and refusal of bad keys/values."""

import pytest
from absl import flags
from ml_collections import config_flags

from configs import k400, ssv2, tiny
from stat_jax import optim
from stat_jax.checks.config import ConfigError, validate
from stat_jax.build import abstract_model


@pytest.mark.parametrize('module,classes', [(k400, 400), (ssv2, 174)])
@pytest.mark.parametrize('frames,window', [('16', 3), ('32', 5), ('64', 7)])
def test_paper_variants(module, classes, frames, window):
  config = module.get_config(frames)
  validate(config)
  assert config.data.num_frames == int(frames)
  assert config.model.window == window
  assert config.model.num_classes == classes


def test_eval_views_follow_the_paper():
  assert (k400.get_config('16').data.num_clips, k400.get_config('16').data.num_crops) == (5, 1)
  assert (k400.get_config('64').data.num_clips, k400.get_config('64').data.num_crops) == (3, 3)
  assert (ssv2.get_config('32').data.num_clips, ssv2.get_config('32').data.num_crops) == (1, 3)
  assert not ssv2.get_config('16').data.flip


def test_repeated_augmentation_keeps_an_epoch_one_pass_over_the_videos():
  config = k400.get_config('16')
  assert config.data.repeated_augment == 2 == ssv2.get_config('16').data.repeated_augment
  assert tiny.get_config().data.repeated_augment == 1
  config.batch_size, config.train_examples, config.num_epochs = 64, 6400, 3
  assert optim.total_steps(config) == 3 * 6400 // 32  # 32 videos a step


def parse(*overrides):
  """Parse a config file + overrides exactly as train.py's flags do."""
  argv = ['prog', '--config=configs/k400.py:16', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_ablation_switches_from_the_command_line():
  config = parse('--config.model.attention=ca+la', '--config.model.window=9',
                 '--config.model.spatial_summary=avgpool',
                 '--config.model.lta=0', '--config.model.stem_layers=5')
  validate(config)
  assert (config.model.attention, config.model.window, config.model.lta,
          config.model.stem_layers) == ('ca+la', 9, 0, 5)


def test_mistyped_override_is_refused_with_its_name():
  with pytest.raises(Exception, match='windw'):
    parse('--config.model.windw=5')


def test_unknown_key_in_a_config_file_is_named_with_a_suggestion():
  config = tiny.get_config()
  config.model.unlock()
  config.model.windw = 5
  with pytest.raises(ConfigError, match=r"'model.windw'.*model.window"):
    validate(config)


@pytest.mark.parametrize('key,value,message', [
    ('model.window', 4, r'model.window = 4: must be an odd integer'),
    ('model.window', 1, r'model.window = 1'),
    ('model.attention', 'sa+la', r'model.attention.*ca, ca\+sa, ca\+la, ca\+sa\+la'),
    ('model.spatial_summary', 'max', r'model.spatial_summary.*cls, avgpool'),
    ('model.lta', -1, r'model.lta = -1'),
    ('model.stem_layers', 2, r'model.stem_layers = 2: must be one of \[1, 3, 5\]'),
    ('data.num_frames', 15, r'data.num_frames = 15: must be a positive multiple of 2'),
    ('data.crop_size', 220, r'data.crop_size = 220: must be divisible by 8'),
    ('data.crop_size', 232, r'data.crop_size = 232: gives a 29x29 token grid.*K/V pooling stride 4'),
    ('data.sampling', 'random', r'data.sampling.*segment, dense'),
    ('dtype', 'float64', r'dtype.*float32, bfloat16'),
    ('grad_accum_steps', 3, r'grad_accum_steps = 3: must be >= 1 and divide batch_size \(64\)'),
    ('model.stem5_hidden', (144, 256), r'model.stem5_hidden = \(144, 256\): must hold the 4'),
    ('attention_images', -1, r'attention_images = -1: must be an integer >= 0'),
    ('data.repeated_augment', 3,
     r'data.repeated_augment = 3: must be an integer >= 1 that divides '
     r'batch_size \(64\)'),
    ('data.repeated_augment', 0, r'data.repeated_augment = 0'),
    ('mesh.slices', 0, r'mesh.slices = 0: must be an integer >= 1'),
    ('mesh.data', 6, r'mesh.slices = 4: must divide mesh.data \(6\)'),
    ('profile_steps', (5,), r'profile_steps = \(5,\): \(start, count\)'),
    ('profile_steps', (0, 3), r'profile_steps = \(0, 3\)'),
    ('compilation_cache_dir', None, r'compilation_cache_dir = None: must be'),
])
def test_invalid_values_are_refused_with_key_and_allowed(key, value, message):
  config = k400.get_config('16')
  config.mesh.slices = 4  # valid while mesh.data is -1 (the mesh.data case)
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)


def test_reversed_classes_must_pair_every_class():
  config = tiny.get_config()  # the synthetic motion set's 12 classes
  validate(config)
  config.data.reversed_classes = (1, 0)
  with pytest.raises(ConfigError, match=r'data.reversed_classes = \(1, 0\): '
                     r'must be empty \(off\) or give each of the 12 classes'):
    validate(config)
  config.data.reversed_classes = (1, 2, 0, *range(3, 12))  # not a pairing
  with pytest.raises(ConfigError, match='reversing twice gives the class back'):
    validate(config)
  config.data.reversed_classes = ()
  validate(config)


def test_build_model_checks_only_what_the_model_reads():
  config = tiny.get_config()
  for training_only in ('optimizer', 'mixup', 'mesh'):
    del config[training_only]
  config.grad_accum_steps = 3  # does not divide batch_size 4
  assert abstract_model(config).head.out_features == 12
  with pytest.raises(ConfigError, match='grad_accum_steps = 3'):
    validate(config)  # what training and evaluation check
  config.model.window = 4
  with pytest.raises(ConfigError, match='model.window = 4'):
    abstract_model(config)


def test_q_pooling_stride_must_divide_the_grid():
  config = k400.get_config('16')
  config.model.kv_stride = 4  # K/V stride 2 at 1/8 resolution, then 1
  config.data.crop_size = 8 * 12  # 12x12 -> Q pooling 6x6 -> 3x3: fine
  validate(config)
  config.data.crop_size = 8 * 6  # 6x6 -> 3x3 -> the second Q pooling fails
  with pytest.raises(ConfigError, match=r'data.crop_size = 48: gives a 3x3 '
                     r'token grid at block 13, not divisible by the Q pooling'):
    validate(config)


def test_unknown_clip_length_is_refused():
  with pytest.raises(ValueError, match='one of'):
    k400.get_config('24')
