"""Refuse a bad experiment config before anything is built or compiled.

The first group of checks (stat_jax/checks/__init__.py). Every key must
exist in the reference schema (stat_jax/defaults.py, so a typo like
`model.windw` is caught even in a config file), and every value must be
one the model and pipeline can honour. Errors name the key,
the value and what is allowed. `validate_model` checks only what the model
reads (build.build_model calls it); `validate` checks everything (training
and evaluation call it). `check_batch_on_mesh` checks the batch against the
devices once the mesh exists, still before any compile.
"""

import difflib

import ml_collections

from stat_jax import arch, conv, defaults, mixup, sharding
from stat_jax.checks.errors import UserError
from stat_jax.attention import (ATTENTION_IMPLS, ATTENTION_SETS, CUDNN_DTYPES,
                                HEAD_LAYOUTS, SPATIAL_SUMMARIES)
from stat_jax.kernels.mlp import MLP_IMPLS

DTYPES = ('float32', 'bfloat16', 'float16', 'auto')
ARCHS = ('stat', 'mvit')
SAMPLINGS = ('segment', 'dense')
GRAD_REDUCE_DTYPES = ('float32', 'bfloat16')


class ConfigError(UserError):
  """A config key or value that cannot be used."""


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Every key of `config` must be a key of the reference schema."""
  known = defaults.flat_keys(defaults.base_config(num_frames=16,
                                                num_classes=400))
  for key in defaults.flat_keys(config):
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3)
      hint = f'; did you mean {", ".join(close)}?' if close else ''
      raise ConfigError(f'unknown config key {key!r}{hint}')


def _require(ok: bool, key: str, value, allowed: str) -> None:
  if not ok:
    raise ConfigError(f'config.{key} = {value!r}: {allowed}')


def check_model(config: ml_collections.ConfigDict) -> None:
  m = config.model
  _require(m.arch in ARCHS, 'model.arch', m.arch,
           f'must be one of {", ".join(ARCHS)}')
  _require(m.arch != 'mvit' or m.stem_layers == 1, 'model.stem_layers',
           m.stem_layers, 'must be 1 with model.arch = mvit (its patch '
           'embedding)')
  _require(config.dtype in DTYPES, 'dtype', config.dtype,
           f'must be one of {", ".join(DTYPES)}')
  _require(m.attention in ATTENTION_SETS, 'model.attention', m.attention,
           f'must be one of {", ".join(ATTENTION_SETS)}')
  _require(isinstance(m.window, int) and m.window >= 3 and m.window % 2 == 1,
           'model.window', m.window, 'must be an odd integer >= 3 (3, 5, 7, 9, ...)')
  _require(m.spatial_summary in SPATIAL_SUMMARIES, 'model.spatial_summary',
           m.spatial_summary, f'must be one of {", ".join(SPATIAL_SUMMARIES)}')
  _require(isinstance(m.lta, int) and m.lta >= 0, 'model.lta', m.lta,
           'must be an integer >= 0 (paper: 0, 1, 2, 4; 0 = average)')
  _require(m.stem_layers in arch.STEM_LAYOUTS, 'model.stem_layers',
           m.stem_layers, f'must be one of {sorted(arch.STEM_LAYOUTS)}')
  stages = len(m.stage_depths)
  for key in ('stage_dims', 'stage_heads'):
    _require(len(m[key]) == stages, f'model.{key}', m[key],
             f'needs one entry per stage ({stages}, like model.stage_depths)')
  for dim, heads in zip(m.stage_dims, m.stage_heads):
    _require(dim % heads == 0, 'model.stage_dims', m.stage_dims,
             f'each width must be divisible by its heads ({m.stage_heads})')
  _require(len(m.stem_hidden) == 2, 'model.stem_hidden', m.stem_hidden,
           'must hold the 2 hidden widths of the 3-layer stem')
  _require(len(m.stem5_hidden) == 4, 'model.stem5_hidden', m.stem5_hidden,
           'must hold the 4 hidden widths of the 5-layer stem')
  for key in ('kv_stride', 'pool_kernel', 'sa_pool'):
    _require(isinstance(m[key], int) and m[key] >= 1, f'model.{key}', m[key],
             'must be an integer >= 1')
  _require(m.attention_impl in ATTENTION_IMPLS, 'model.attention_impl',
           m.attention_impl, f'must be one of {", ".join(ATTENTION_IMPLS)}')
  # 'auto' is bfloat16 on the GPUs that cudnn runs on.
  _require(m.attention_impl != 'cudnn' or config.dtype in (*CUDNN_DTYPES, 'auto'),
           'model.attention_impl', m.attention_impl,
           f'cudnn needs dtype {" or ".join(CUDNN_DTYPES)} (dtype is '
           f'{config.dtype!r}); use auto or xla')
  _require(m.conv_impl in conv.CONV_IMPLS, 'model.conv_impl', m.conv_impl,
           f'must be one of {", ".join(conv.CONV_IMPLS)}')
  _require(m.mlp_impl in MLP_IMPLS, 'model.mlp_impl', m.mlp_impl,
           f'must be one of {", ".join(MLP_IMPLS)}')
  _require(m.head_layout in HEAD_LAYOUTS, 'model.head_layout', m.head_layout,
           f'must be one of {", ".join(HEAD_LAYOUTS)}')
  _require(0 <= m.drop_path < 1, 'model.drop_path', m.drop_path, 'must be in [0, 1)')
  _require(0 <= m.dropout < 1, 'model.dropout', m.dropout, 'must be in [0, 1)')
  _require(m.num_classes >= 1, 'model.num_classes', m.num_classes, 'must be >= 1')


def check_input(config: ml_collections.ConfigDict) -> None:
  """The clip size must divide through the stem and every pooling stride."""
  d, m = config.data, config.model
  st, sh, _ = arch.stem_stride(m)
  _require(d.num_frames >= st and d.num_frames % st == 0, 'data.num_frames',
           d.num_frames, f'must be a positive multiple of {st} (the temporal '
           f'stride of the {m.stem_layers}-layer stem)')
  _require(d.crop_size % sh == 0, 'data.crop_size', d.crop_size,
           f'must be divisible by {sh} (the spatial stride of the '
           f'{m.stem_layers}-layer stem)')
  size = d.crop_size // sh
  for i, block in enumerate(arch.block_specs(m)):
    _require(size % block.kv_stride == 0, 'data.crop_size', d.crop_size,
             f'gives a {size}x{size} token grid at block {i}, not divisible by '
             f'its K/V pooling stride {block.kv_stride} (model.kv_stride='
             f'{m.kv_stride}); use a crop whose token grid divides')
    if block.q_stride > 1:
      _require(size % block.q_stride == 0, 'data.crop_size', d.crop_size,
               f'gives a {size}x{size} token grid at block {i}, not divisible '
               f'by the Q pooling stride {block.q_stride}')
      size //= block.q_stride


def check_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  _require(d.sampling in SAMPLINGS, 'data.sampling', d.sampling,
           f'must be one of {", ".join(SAMPLINGS)}')
  _require(isinstance(d.max_consecutive_skips, int)
           and d.max_consecutive_skips >= 1, 'data.max_consecutive_skips',
           d.max_consecutive_skips, 'must be an integer >= 1')
  _require(0 <= d.skip_warning_fraction <= 1, 'data.skip_warning_fraction',
           d.skip_warning_fraction, 'must be in [0, 1]')
  reverse = tuple(d.reversed_classes)
  if reverse:
    count = config.model.num_classes
    _require(len(reverse) == count and set(reverse) <= set(range(count))
             and all(reverse[r] == c for c, r in enumerate(reverse)),
             'data.reversed_classes', d.reversed_classes,
             f'must be empty (off) or give each of the {count} classes the '
             'class it becomes played backwards (reversing twice gives the '
             'class back)')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_training(config: ml_collections.ConfigDict) -> None:
  """Run control and the training recipe: what would otherwise fail after
  compiling (a zero frequency), do nothing (negative steps) or train on
  nonsense (a negative learning rate)."""
  _require(config.batch_size >= 1, 'batch_size', config.batch_size, 'must be >= 1')
  _require(_is_int(config.total_steps) and config.total_steps >= 0,
           'total_steps', config.total_steps,
           'must be an integer >= 0 (0 = derive from num_epochs)')
  if not config.total_steps:
    _require(config.num_epochs > 0, 'num_epochs', config.num_epochs,
             'must be > 0 when total_steps = 0 (it derives the step count)')
    _require(_is_int(config.train_examples) and config.train_examples >= 1,
             'train_examples', config.train_examples, 'must be an integer >= 1')
  for key in ('log_every', 'eval_every', 'checkpoint_every'):
    _require(_is_int(config[key]) and config[key] >= 1, key, config[key],
             'must be an integer >= 1 (a step count)')
  _require(_is_int(config.attention_images) and config.attention_images >= 0,
           'attention_images', config.attention_images,
           'must be an integer >= 0 (0 = no attention maps in TensorBoard)')
  _require(config.model.arch == 'stat' or not config.attention_images,
           'attention_images', config.attention_images,
           f'must be 0 with model.arch = {config.model.arch} (the maps are '
           "STA's)")
  _require(_is_int(config.keep_checkpoints) and config.keep_checkpoints >= 1,
           'keep_checkpoints', config.keep_checkpoints,
           'must be an integer >= 1 (0 would delete each checkpoint as soon '
           'as it is written)')
  k = config.data.repeated_augment
  _require(_is_int(k) and k >= 1 and config.batch_size % k == 0,
           'data.repeated_augment', k, 'must be an integer >= 1 that divides '
           f'batch_size ({config.batch_size}): the clips of a video')
  _require(config.grad_accum_steps >= 1
           and config.batch_size % config.grad_accum_steps == 0,
           'grad_accum_steps', config.grad_accum_steps,
           f'must be >= 1 and divide batch_size ({config.batch_size})')
  _require(config.grad_reduce_dtype in GRAD_REDUCE_DTYPES, 'grad_reduce_dtype',
           config.grad_reduce_dtype,
           f'must be one of {", ".join(GRAD_REDUCE_DTYPES)}')
  _require(isinstance(config.compilation_cache_dir, str),
           'compilation_cache_dir', config.compilation_cache_dir,
           "must be a folder (a gs:// path works too), or '' (off)")
  window = tuple(config.profile_steps)
  _require(window == (0, 0) or (len(window) == 2 and all(map(_is_int, window))
                                and min(window) >= 1), 'profile_steps',
           config.profile_steps, '(start, count) of positive integers, e.g. '
           '(100, 5), or (0, 0) (off)')
  check_recipe(config)


def check_mesh(config: ml_collections.ConfigDict) -> None:
  """What the mesh settings say alone (the device count: sharding.py)."""
  mesh = config.mesh
  for key in ('fsdp', 'slices'):
    _require(_is_int(mesh[key]) and mesh[key] >= 1, f'mesh.{key}', mesh[key],
             'must be an integer >= 1')
  _require(_is_int(mesh.data) and (mesh.data == -1 or mesh.data >= 1),
           'mesh.data', mesh.data, 'must be an integer >= 1, or -1 (all '
           'devices not used by fsdp)')
  _require(mesh.data == -1 or mesh.data % mesh.slices == 0, 'mesh.slices',
           mesh.slices, f'must divide mesh.data ({mesh.data}): each slice '
           'holds an equal part of the data axis')


def check_recipe(config: ml_collections.ConfigDict) -> None:
  """The optimizer and mixup sections (absent from a model-only config)."""
  if 'optimizer' not in config or 'mixup' not in config:
    return
  opt = config.optimizer
  _require(opt.base_lr > 0, 'optimizer.base_lr', opt.base_lr, 'must be > 0')
  _require(0 <= opt.min_lr <= opt.base_lr, 'optimizer.min_lr', opt.min_lr,
           f'must be in [0, optimizer.base_lr = {opt.base_lr}]')
  _require(opt.warmup_epochs >= 0, 'optimizer.warmup_epochs',
           opt.warmup_epochs, 'must be >= 0')
  _require(opt.weight_decay >= 0, 'optimizer.weight_decay', opt.weight_decay,
           'must be >= 0')
  for key in ('b1', 'b2'):
    _require(0 <= opt[key] < 1, f'optimizer.{key}', opt[key], 'must be in [0, 1)')
  _require(opt.grad_clip > 0, 'optimizer.grad_clip', opt.grad_clip,
           'must be > 0 (the global gradient norm is clipped to it)')
  mix = config.mixup
  for key in ('mixup_alpha', 'cutmix_alpha'):
    _require(mix[key] >= 0, f'mixup.{key}', mix[key], 'must be >= 0 (0 = off)')
  for key in ('prob', 'switch_prob'):
    _require(0 <= mix[key] <= 1, f'mixup.{key}', mix[key], 'must be in [0, 1]')
  _require(0 <= mix.label_smoothing < 1, 'mixup.label_smoothing',
           mix.label_smoothing, 'must be in [0, 1)')
  videos = config.batch_size // config.data.repeated_augment
  _require(videos >= 2 or not mixup.mixes(mix),
           'batch_size', config.batch_size,
           f'holds {videos} video (batch_size / data.repeated_augment): '
           'mixup and CutMix mix a clip with another video; give 2 or more, '
           'or set mixup.mixup_alpha = mixup.cutmix_alpha = 0. Each clip is '
           'paired on its own device while a device holds 2 videos or more, '
           'else with the next video\'s device (a collective permute of the '
           'clips per step)')


def validate_model(config: ml_collections.ConfigDict) -> None:
  """validate() for what the model reads: keys, config.model, dtype and the
  clip shape; training fields may be absent."""
  check_keys(config)
  check_model(config)
  check_input(config)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise ConfigError naming the first bad key; return None if all is well."""
  validate_model(config)
  check_data(config)
  check_training(config)
  check_mesh(config)


def check_batch_on_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """The batch splits over the devices of `mesh`: equally, each device's
  clips into config.grad_accum_steps micro-batches (each device splits its
  own rows), and into mixup pairs (stat_jax/mixup.py: each device's clips
  and data.repeated_augment must divide one another)."""
  sharding.check_batch(config.batch_size, mesh)
  per_device = config.batch_size // mesh.size
  if per_device % config.grad_accum_steps:
    raise UserError(
        f'config.grad_accum_steps={config.grad_accum_steps} does not divide '
        f'the {per_device} clips of each of the {mesh.size} devices '
        f'(batch_size {config.batch_size}): each device splits its own clips '
        'into the micro-batches')
  if mixup.mixes(config.mixup):
    mixup.check_pairing(per_device, config.data.repeated_augment)
