"""The synthetic motion dataset: classes that differ only by motion.

Twelve classes in six time-reversed pairs (no 'static' class): a clip of class
2k+1 is literally a clip of class 2k played backwards, so `reverse_class` maps
each label to its pair and only temporal order separates them. Shapes, object
colours and textures, background textures, sizes, speeds and start positions
are random; every clip is a pure function of (seed, split, index).

Backgrounds are mid-grey under a random texture, not a random colour: a
per-clip offset of the whole input stalls learning from scratch (the demo
STAT, and a plain 3D CNN, stay at chance; benchmarks/RESULTS.md, "The demo").

  python -m stat_jax.data.synthetic --out /tmp/motion --train 1000 --val 200

writes `train.tfrecord-0000X-of-0000N`, `val.tfrecord-...` (DMVR layout) and
label_map.txt. Train with flip off: left/right and cw/ccw are labels.
"""

import json
import math
import os
import shutil
import time

import numpy as np
import tensorflow as tf
from absl import flags

from stat_jax.data import dmvr
from stat_jax import cli, storage
from stat_jax.checks.errors import UserError, report_user_errors

CLASSES = (
    'move_left', 'move_right',
    'move_up', 'move_down',
    'rotate_clockwise', 'rotate_counterclockwise',
    'grow', 'shrink',
    'approach', 'separate',
    'appear', 'disappear',
)
# Bumped whenever rendering changes, so prepare() refuses an old cache.
GENERATOR_VERSION = 2
_SPLIT_CODES = {'train': 0, 'val': 1}
_CLIPS_PER_SHARD = 256
_SHAPES = ('ellipse', 'rectangle', 'triangle')


def reverse_class(label: int) -> int:
  """The class whose clips are this class's clips played backwards."""
  if not 0 <= label < len(CLASSES):
    raise ValueError(f'label: expected 0..{len(CLASSES) - 1}, got {label}')
  return label ^ 1


# config.data.reversed_classes of a config that trains on this set: the
# time-reversal score of every evaluation.
REVERSED_CLASSES = tuple(reverse_class(label) for label in range(len(CLASSES)))


# --------------------------------------------------------------- rendering ---

_BACKGROUND_GREY = 128.0


def _background(rng, size):
  """float32 [size, size, 3]: mid-grey plus a static gradient/blob texture."""
  base = np.full(3, _BACKGROUND_GREY)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  kind = rng.integers(3)
  if kind == 0:  # linear gradient
    angle = rng.uniform(0, 2 * math.pi)
    pattern = (np.cos(angle) * xx + np.sin(angle) * yy) - 0.5
  elif kind == 1:  # smooth blobs: a coarse random grid, upsampled
    coarse = rng.uniform(-0.5, 0.5, (5, 5))
    idx = np.minimum((np.arange(size) * 4 / size).astype(int), 3)
    frac = (np.arange(size) * 4 / size) - idx
    rows = coarse[idx] * (1 - frac)[:, None] + coarse[idx + 1] * frac[:, None]
    pattern = rows[:, idx] * (1 - frac) + rows[:, idx + 1] * frac
  else:
    pattern = np.zeros((size, size))
  amplitude = rng.uniform(0, 60)
  return (base + amplitude * pattern[..., None]).astype(np.float32), base


def _object_colour(rng, background_mean):
  """A colour at least 90 (L2, RGB) away from the background's mean."""
  for _ in range(20):
    colour = rng.uniform(0, 255, 3)
    if np.linalg.norm(colour - background_mean) > 90:
      return colour
  return 255 - background_mean


def _coverage(shape, u, v, half_a, half_b, pixel):
  """Anti-aliased coverage in [0, 1] of a shape in object coordinates (u, v).

  `pixel` [T, 1, 1]: object units per pixel, so edges are one pixel wide.
  """
  if shape == 'ellipse':
    dist = (np.sqrt((u / half_a) ** 2 + (v / half_b) ** 2) - 1) * half_b
  elif shape == 'rectangle':
    dist = np.maximum(np.abs(u) - half_a, np.abs(v) - half_b)
  else:  # triangle pointing +u: apex (a, 0), base at u = -a
    slope = half_b / (2 * half_a)
    edge = (slope * (u - half_a) + np.abs(v)) / math.hypot(1, slope)
    dist = np.maximum(edge, -u - half_a)
  return np.clip(0.5 - dist / pixel, 0, 1)


def _texture(rng, u, v):
  """Multiplicative texture attached to the object: flat, stripes, checks."""
  kind = rng.integers(3)
  if kind == 0:
    return np.ones_like(u)
  period = rng.uniform(3, 6)
  stripes = np.sign(np.sin(2 * math.pi * u / period))
  if kind == 2:
    stripes = stripes * np.sign(np.sin(2 * math.pi * v / period))
  return 1 + rng.uniform(0.15, 0.35) * stripes


def _draw(canvas, rng, size, centre, angle, scale, alpha):
  """Composites one random textured shape onto canvas [T, S, S, 3] in place.

  centre [T, 2] (x, y) pixels, angle [T] radians (clockwise on screen),
  scale [T], alpha [T]; the base shape's half-length is 1/6 of the frame.
  """
  shape = _SHAPES[rng.integers(len(_SHAPES))]
  half_a = size / 6
  half_b = half_a * rng.uniform(0.45, 0.6)
  coords = np.arange(size, dtype=np.float32) + 0.5
  dx = coords[None, None, :] - centre[:, 0, None, None]  # [T, 1, S]
  dy = coords[None, :, None] - centre[:, 1, None, None]  # [T, S, 1]
  cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  pixel = 1 / scale[:, None, None]
  u = (cos * dx + sin * dy) * pixel  # [T, S, S], inverse rotation + scale
  v = (-sin * dx + cos * dy) * pixel
  cover = _coverage(shape, u, v, half_a, half_b, pixel)
  cover *= alpha[:, None, None]
  colour = _object_colour(rng, canvas[0].mean((0, 1)))
  paint = colour * _texture(rng, u, v)[..., None]  # [T, S, S, 3]
  canvas *= 1 - cover[..., None]
  canvas += cover[..., None] * paint


def _forward_clip(pair, rng, num_frames, size):
  """float32 [T, S, S, 3] of the first (even) class of a motion pair."""
  background, bg_mean = _background(rng, size)
  canvas = np.repeat(background[None], num_frames, axis=0)
  t = np.linspace(0, 1, num_frames, dtype=np.float32)  # [T]
  ones = np.ones_like(t)
  mid = size / 2
  jitter = lambda r: rng.uniform(-r, r) * size
  angle0 = rng.uniform(0, 2 * math.pi) * ones
  if pair in (0, 1):  # move left / move up: travel 45-70 % of the frame
    travel = rng.uniform(0.45, 0.7) * size
    along = mid + jitter(0.08) + travel * (0.5 - t)
    across = rng.uniform(0.3, 0.7) * size * ones
    centre = np.stack([along, across] if pair == 0 else [across, along], -1)
    _draw(canvas, rng, size, centre, angle0, 0.9 * ones, ones)
  elif pair == 2:  # rotate clockwise by 120-240 degrees
    turn = rng.uniform(2 / 3, 4 / 3) * math.pi
    centre = np.stack([mid + jitter(0.1) * ones, mid + jitter(0.1) * ones], -1)
    _draw(canvas, rng, size, centre, angle0 + turn * t, 1.3 * ones, ones)
  elif pair == 3:  # grow by 2.5-3.5x
    ratio = rng.uniform(2.5, 3.5)
    centre = np.stack([mid + jitter(0.1) * ones, mid + jitter(0.1) * ones], -1)
    scale = 0.45 * ratio ** t
    _draw(canvas, rng, size, centre, angle0, scale, ones)
  elif pair == 4:  # approach: two shapes close in horizontally
    gap = rng.uniform(0.28, 0.38) - (rng.uniform(0.2, 0.26)) * t
    row = mid + jitter(0.15)
    for side in (-1, 1):
      centre = np.stack([mid + side * gap * size, row * ones], -1)
      _draw(canvas, rng, size, centre, angle0, 0.65 * ones, ones)
  else:  # appear: fade in between random start and end times
    start, end = rng.uniform(0, 0.25), rng.uniform(0.6, 0.9)
    alpha = np.clip((t - start) / (end - start), 0, 1)
    centre = np.stack([mid + jitter(0.15) * ones, mid + jitter(0.15) * ones], -1)
    _draw(canvas, rng, size, centre, angle0, ones, alpha)
  canvas += rng.normal(0, 3, canvas.shape).astype(np.float32)  # sensor noise
  return canvas


def render_clip(label: int, seed: int, split: str, index: int,
                num_frames: int = 32, size: int = 64) -> np.ndarray:
  """uint8 [num_frames, size, size, 3]; a pure function of its arguments."""
  rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
  frames = _forward_clip(label // 2, rng, num_frames, size)
  if label % 2:
    frames = frames[::-1]  # the reversed member of the pair
  return np.clip(frames + 0.5, 0, 255).astype(np.uint8)


def clip_label(index: int) -> int:
  """Balanced labels: clip i of a split has class i mod len(CLASSES)."""
  return index % len(CLASSES)


# ----------------------------------------------------------------- writing ---

def _num_shards(num_clips):
  return max(1, math.ceil(num_clips / _CLIPS_PER_SHARD))


def _split_spec(out_dir, split, num_clips):
  return f'{storage.join(out_dir, split)}.tfrecord@{_num_shards(num_clips)}'


def write_split(out_dir: str, split: str, num_clips: int, num_frames: int,
                size: int, seed: int) -> str:
  """Writes one split as DMVR shards (clip i -> shard i mod N); its spec."""
  num_shards = _num_shards(num_clips)
  prefix = storage.join(out_dir, f'{split}.tfrecord')
  with dmvr.ShardedWriter(prefix, num_shards) as writer:
    for index in range(num_clips):
      label = clip_label(index)
      frames = render_clip(label, seed, split, index, num_frames, size)
      example = dmvr.make_example(
          dmvr.encode_frames(frames), label, CLASSES[label],
          filename=f'synthetic_motion/{split}/{index:06d}')
      writer.write(index % num_shards, example.SerializeToString())
  return writer.spec


def _params(num_train, num_val, num_frames, size, seed) -> dict:
  """What params.json records of a generated set (prepare compares it)."""
  return {'train': num_train, 'val': num_val, 'frames': num_frames,
          'size': size, 'seed': seed, 'generator': GENERATOR_VERSION}


def _check_out(out_dir, params):
  """Refuse to write over a different set (or another data set) in out_dir."""
  params_path = storage.join(out_dir, 'params.json')
  if tf.io.gfile.exists(params_path):
    found = json.loads(storage.read_text(params_path))
    if found != params:
      raise UserError(f'{out_dir} holds a synthetic set made with {found}, '
                       f'not {params}; choose another --out or remove it')
    return
  held = sorted(name for name in (tf.io.gfile.listdir(out_dir)
                                  if tf.io.gfile.isdir(out_dir) else [])
                if name == 'label_map.txt' or '.tfrecord' in name)
  if held:
    raise UserError(f'{out_dir} already holds a data set ({", ".join(held[:3])}'
                     f'{", ..." if len(held) > 3 else ""}); choose another '
                     '--out or remove it')


def generate(out_dir: str, num_train: int, num_val: int, num_frames: int = 32,
             size: int = 64, seed: int = 0) -> dict:
  """Writes both splits, label_map.txt and params.json; {'train', 'val',
  'label_map'}. A folder holding another set (or other shards) is refused;
  the same set is written again."""
  params = _params(num_train, num_val, num_frames, size, seed)
  _check_out(out_dir, params)
  label_map = storage.join(out_dir, 'label_map.txt')
  storage.make_folder(out_dir)
  dmvr.write_label_map(label_map, CLASSES)
  specs = {'label_map': label_map}
  for split, count in (('train', num_train), ('val', num_val)):
    specs[split] = write_split(out_dir, split, count, num_frames, size, seed)
  storage.write_text(storage.join(out_dir, 'params.json'), json.dumps(params))
  return specs


def prepare(data) -> dict:
  """Fills data.train_spec / eval_spec / label_map from data.synthetic (the
  config block of stat_jax/defaults.py) when data.synthetic.generate is set,
  generating the set into data.synthetic.dir first if it is absent.

  Generation writes a temporary folder and renames it into place, so
  processes racing on a shared folder agree. A folder made with other
  parameters is an error, never silently reused. Returns the specs ({} when
  generate is off).
  """
  spec = data.synthetic
  if not spec.generate:
    return {}
  params = _params(spec.train_clips, spec.val_clips, spec.frames, spec.size,
                   spec.seed)
  params_path = storage.join(spec.dir, 'params.json')
  if storage.is_remote(spec.dir) and not tf.io.gfile.exists(params_path):
    # A bucket renames nothing; generate() writes params.json last.
    generate(spec.dir, spec.train_clips, spec.val_clips, spec.frames,
             spec.size, spec.seed)
  elif not tf.io.gfile.exists(params_path):
    staging = f'{spec.dir}.tmp{os.getpid()}'
    generate(staging, spec.train_clips, spec.val_clips, spec.frames,
             spec.size, spec.seed)
    with open(os.path.join(staging, 'params.json'), 'w') as f:
      json.dump(params, f)
    os.makedirs(os.path.dirname(os.path.abspath(spec.dir)), exist_ok=True)
    try:
      os.rename(staging, spec.dir)
    except OSError:  # another process finished first
      shutil.rmtree(staging)
  found = json.loads(storage.read_text(params_path))
  if found != params:
    raise UserError(f'{spec.dir} holds a synthetic set made with {found}, '
                     f'config data.synthetic asks for {params}')
  specs = {'train': _split_spec(spec.dir, 'train', spec.train_clips),
           'val': _split_spec(spec.dir, 'val', spec.val_clips),
           'label_map': storage.join(spec.dir, 'label_map.txt')}
  data.train_spec, data.eval_spec = specs['train'], specs['val']
  data.label_map = specs['label_map']
  return specs


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('out', None, 'Folder to write.', flag_values=FLAGS,
                    required=True)
flags.DEFINE_integer('train', None, 'Train clips.', flag_values=FLAGS,
                     required=True)
flags.DEFINE_integer('val', None, 'Val clips.', flag_values=FLAGS,
                     required=True)
flags.DEFINE_integer('frames', 32, 'Frames per clip.', flag_values=FLAGS)
flags.DEFINE_integer('size', 64, 'Frame height and width.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Random seed.', flag_values=FLAGS)


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('stat_jax.data.synthetic', _generate)


def _generate() -> int:
  start = time.time()
  specs = generate(FLAGS.out, FLAGS.train, FLAGS.val, FLAGS.frames,
                   FLAGS.size, FLAGS.seed)
  print(f'wrote {FLAGS.train} train + {FLAGS.val} val clips of '
        f'{FLAGS.frames}x{FLAGS.size}x{FLAGS.size} in '
        f'{time.time() - start:.1f}s')
  for name, spec in specs.items():
    print(f'  {name}: {spec}')
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
