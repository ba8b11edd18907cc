"""Long videos in predict: the classes of a sliding window over time.

  python -m stat_jax.deploy.predict --workdir=runs/demo --window_s=2 \
      --stride_s=1 --timeline=t.json --overlay=o.mp4 long.mp4

A window of `window_s` seconds slides by `stride_s` over the whole video
(both rounded to whole frames at the video's average frame rate; the last
window ends at the last frame, shorter if the stride does not divide the
rest). In each window the config's T frames are sampled as the eval sampler
samples a clip (stat_jax/data/sampling.py, one clip: segment centres, or a centred
dense span), its short side resized and cut into the config's spatial
crops; the crops' probabilities are averaged. The video is decoded once,
keeping only the last window's frames, and the windows go through the model
in batches of `batch_windows` (the last padded: one compiled shape).

Outputs: `--timeline=T.json` ({"windows": [{"start_s", "end_s", "top5":
[[name, prob], ...]}, ...]} with the video, its frame rate and count) and
T.png (the top classes over time, stat_jax/plots.py); `--overlay=O.mp4`:
the video re-encoded (same frame count and rate, no audio, sides rounded
down to even) with the top-3 of the window whose centre is nearest each
frame drawn on it (Pillow).
"""

import collections
import json
import math
import os
import sys
from fractions import Fraction

import av
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from stat_jax.data import convert, sampling
from stat_jax import plots, storage
from stat_jax.checks.errors import UserError

OVERLAY_TOP = 3
TIMELINE_TOP = 5


# ------------------------------------------------------------------ windows ---

def window_frames(fps: float, window_s: float,
                  stride_s: float) -> tuple[int, int]:
  """(window, stride) in whole frames (at least one) at `fps`."""
  return (max(1, round(window_s * fps)), max(1, round(stride_s * fps)))


def window_bounds(num_frames: int, window: int,
                  stride: int) -> list[tuple[int, int]]:
  """[(start, end)] frame ranges (end exclusive) of windows of `window`
  frames every `stride` frames: they start at 0, stride, ... and stop with
  the first that reaches the last frame (cut to end there); a video shorter
  than a window is one window; no window starts past the end."""
  if num_frames < 1:
    return []
  count = 1 + max(0, math.ceil((num_frames - window) / stride))
  count = min(count, math.ceil(num_frames / stride))
  return [(k * stride, min(k * stride + window, num_frames))
          for k in range(count)]


def window_indices(length: int, data) -> np.ndarray:
  """int [T]: the frames the eval sampler takes from a clip of `length`
  frames, as one clip (num_clips = 1)."""
  one_clip = data.copy_and_resolve_references()
  one_clip.num_clips = 1
  return sampling.eval_indices(length, one_clip).numpy()[0]


def video_rate(stream) -> Fraction:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  if not rate:
    raise ValueError('the video stream has no frame rate')
  return Fraction(rate)


def _progress(stream, rate: Fraction):
  """A bar over the decoded frames, on stderr, shown after 2 s (long videos
  only), not when stderr is not a terminal."""
  total = stream.frames or None
  if not total and stream.duration and stream.time_base:
    total = round(float(stream.duration * stream.time_base * rate)) or None
  return tqdm(total=total, unit='frame', delay=2, disable=None,
              file=sys.stderr, dynamic_ncols=True, leave=False)


def window_clips(path: str, data, window_s: float, stride_s: float,
                 info: dict):
  """Yields ((start, end), uint8 clip [T, h, w, 3]) per window in order,
  short side resized to data.eval_short_side, decoding the video once and
  keeping only the last window's frames. Fills `info` with 'fps' (float)
  and, at the end, 'num_frames'."""
  indices = {}  # window length -> sampled offsets

  def clip(buffer, seen, start, end):
    length = end - start
    if length not in indices:
      indices[length] = window_indices(length, data)
    first = seen - len(buffer)  # frame index of buffer[0]
    return np.stack([buffer[start + i - first] for i in indices[length]])

  with convert.open_video(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    rate = video_rate(stream)
    info['fps'] = float(rate)
    window, stride = window_frames(float(rate), window_s, stride_s)
    buffer = collections.deque(maxlen=window)
    emitted, seen = [], 0
    with _progress(stream, rate) as bar:
      for frame in container.decode(stream):
        width, height = convert._resized_size(  # pylint: disable=protected-access
            frame.width, frame.height, data.eval_short_side)
        buffer.append(frame.to_ndarray(width=width, height=height,
                                       format='rgb24'))
        seen += 1
        bar.update()
        start = len(emitted) * stride
        if start + window == seen:  # a whole window ends at this frame
          emitted.append((start, seen))
          yield emitted[-1], clip(buffer, seen, start, seen)
  if not seen:
    raise ValueError('no frames')
  info['num_frames'] = seen
  bounds = window_bounds(seen, window, stride)
  assert bounds[:len(emitted)] == emitted, (bounds, emitted)
  for start, end in bounds[len(emitted):]:  # the cut last one, if any
    yield (start, end), clip(buffer, seen, start, end)


def _batches(items, size: int):
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def predict_windows(classifier, path: str, window_s: float, stride_s: float,
                    batch_windows: int = 8) -> dict:
  """{'video', 'fps', 'num_frames', 'window_s', 'stride_s', 'windows':
  [{'start_s', 'end_s', 'start_frame', 'end_frame', 'probabilities'
  (float32 [classes])}]}. `classifier`: predict.Classifier (its data
  config, classes, and uint8 views -> probabilities)."""
  data = classifier.data
  info, windows = {}, []
  clips = window_clips(path, data, window_s, stride_s, info)
  for batch in _batches(clips, batch_windows):
    stacked = np.stack([c for _, c in batch])  # [n, T, h, w, 3]
    padding = batch_windows - len(batch)  # one shape for the jitted model
    if padding:
      stacked = np.concatenate(
          [stacked, np.zeros((padding, *stacked.shape[1:]), np.uint8)])
    views = sampling.spatial_crops(tf.constant(stacked), data.crop_size,
                                   data.num_crops).numpy()
    probabilities = np.asarray(classifier.probabilities(views))
    probabilities = probabilities.reshape(batch_windows, data.num_crops, -1)
    for ((start, end), _), p in zip(batch, probabilities.mean(axis=1)):
      windows.append({'start_frame': start, 'end_frame': end,
                      'start_s': start / info['fps'],
                      'end_s': end / info['fps'], 'probabilities': p})
  return {'video': path, 'fps': info['fps'], 'num_frames': info['num_frames'],
          'window_s': window_s, 'stride_s': stride_s, 'windows': windows}


def top(probabilities, classes, k: int) -> list[list]:
  """[[name, probability]] of the k most probable classes."""
  best = np.argsort(-probabilities, kind='stable')[:k]
  return [[classes[i], float(probabilities[i])] for i in best]


# ---------------------------------------------------------------- timeline ---

def timeline(result: dict, classes: list[str]) -> dict:
  """The JSON of --timeline."""
  return {'video': result['video'], 'fps': result['fps'],
          'num_frames': result['num_frames'], 'window_s': result['window_s'],
          'stride_s': result['stride_s'],
          'windows': [{'start_s': round(w['start_s'], 6),
                       'end_s': round(w['end_s'], 6),
                       'top5': top(w['probabilities'], classes, TIMELINE_TOP)}
                      for w in result['windows']]}


def png_path(timeline_path: str) -> str:
  return storage.strip_extension(timeline_path) + '.png'


def write_timeline(result: dict, classes: list[str], path: str) -> list[str]:
  """Writes `path` (JSON) and its .png (the top classes over time); the
  two paths."""
  storage.write_text(path, json.dumps(timeline(result, classes), indent=1))
  windows = [{'start_s': w['start_s'], 'end_s': w['end_s'],
              'probabilities': dict(zip(classes, map(float,
                                                     w['probabilities'])))}
             for w in result['windows']]
  figure = plots.long_video_figure(windows)
  figure.axes[0].set_title(f'top classes over time: '
                           f'{storage.basename(result["video"])}')
  return [path, plots.save(figure, png_path(path))]


# ----------------------------------------------------------------- overlay ---

def frame_windows(num_frames: int, windows: list[dict]) -> np.ndarray:
  """int [num_frames]: per frame, the window whose centre is nearest (the
  earlier on a tie)."""
  centres = np.array([(w['start_frame'] + w['end_frame']) / 2
                      for w in windows])
  times = np.arange(num_frames) + 0.5  # frame i spans [i, i + 1)
  after = np.clip(np.searchsorted(centres, times), 1, len(centres) - 1)
  before = after - 1
  if len(centres) == 1:
    return np.zeros(num_frames, np.int64)
  nearer_before = (times - centres[before]) <= (centres[after] - times)
  return np.where(nearer_before, before, after)


def _label(image: Image.Image, lines: list[str]) -> Image.Image:
  size = max(9, image.height // 18)
  font = ImageFont.load_default(size=size)
  draw = ImageDraw.Draw(image, 'RGBA')
  text = '\n'.join(lines)
  margin = max(2, size // 4)
  box = draw.multiline_textbbox((margin, margin), text, font=font,
                                spacing=margin)
  draw.rectangle((0, 0, box[2] + margin, box[3] + margin),
                 fill=(0, 0, 0, 150))
  draw.multiline_text((margin, margin), text, font=font, spacing=margin,
                      fill=(255, 255, 255, 255))
  return image


def _codec(path: str) -> str:
  """H.264 for .mp4 / .mkv / .mov, VP9 for .webm, else MPEG-4 part 2."""
  extension = path[len(storage.strip_extension(path)):].lower()
  wanted = {'.mp4': 'libx264', '.mkv': 'libx264', '.mov': 'libx264',
            '.webm': 'libvpx-vp9'}.get(extension, 'mpeg4')
  return wanted if wanted in av.codecs_available else 'mpeg4'


def write_overlay(result: dict, classes: list[str], path: str) -> str:
  """Re-encodes result['video'] to `path` with the top-3 of the nearest
  window drawn on every frame; same frame count and rate."""
  labels = [[f'{p:.2f} {name}' for name, p in
             top(w['probabilities'], classes, OVERLAY_TOP)]
            for w in result['windows']]
  which = frame_windows(result['num_frames'], result['windows'])
  with convert.open_video(result['video']) as source, \
       storage.local_copy_for_writing(path) as local, \
       av.open(local, 'w') as out:
    stream = source.streams.video[0]
    stream.thread_type = 'AUTO'
    rate = video_rate(stream)
    encoder = None
    for i, frame in enumerate(source.decode(stream)):
      if encoder is None:
        width, height = frame.width // 2 * 2, frame.height // 2 * 2
        codec = _codec(path)
        encoder = out.add_stream(codec, rate=rate, options=(
            {'crf': '18'} if codec == 'libx264' else {}))
        encoder.width, encoder.height = width, height
        encoder.pix_fmt = 'yuv420p'
      image = frame.to_image()  # PIL RGB
      if image.size != (width, height):
        image = image.crop((0, 0, width, height))
      _label(image, labels[which[min(i, len(which) - 1)]])
      for packet in encoder.encode(av.VideoFrame.from_image(image)):
        out.mux(packet)
    if encoder is not None:
      for packet in encoder.encode():
        out.mux(packet)
  return path


# -------------------------------------------------------------- the command ---

def check_options(videos: list[str], window_s, stride_s, timeline_path,
                  overlay_path) -> None:
  """UserError for an option predict's long-video mode cannot honour."""
  if window_s is None:
    given = [name for name, value in (('--stride_s', stride_s),
                                      ('--timeline', timeline_path),
                                      ('--overlay', overlay_path)) if value]
    if given:
      raise UserError(f'{", ".join(given)} need(s) --window_s')
    return
  if window_s <= 0 or (stride_s is not None and stride_s <= 0):
    raise UserError('--window_s and --stride_s must be > 0 seconds')
  if len(videos) != 1 and (timeline_path or overlay_path):
    raise UserError('--timeline and --overlay take one video; got '
                    f'{len(videos)}')
  for flag, path in (('--timeline', timeline_path),
                     ('--overlay', overlay_path)):
    folder = storage.parent(storage.absolute(path)) if path else None
    if folder and not storage.is_remote(folder) and not os.path.isdir(folder):
      raise UserError(f'{flag}={path}: no folder {folder}')


def format_windows(result: dict, classes: list[str], top_k: int) -> str:
  lines = [f'{result["video"]} ({len(result["windows"])} windows of '
           f'{result["window_s"]:g} s every {result["stride_s"]:g} s, '
           f'{result["num_frames"]} frames at {result["fps"]:.4g} fps)']
  for w in result['windows']:
    best = ' | '.join(f'{p:.4f} {name}' for name, p in
                      top(w['probabilities'], classes, top_k))
    lines.append(f'  {w["start_s"]:8.2f}-{w["end_s"]:.2f} s  {best}')
  return '\n'.join(lines)


def run(classifier, videos: list[str], program: str, *, window_s: float,
        stride_s: float | None, timeline_path: str | None,
        overlay_path: str | None, top_k: int, as_json: bool,
        batch_windows: int = 8) -> int:
  """predict with --window_s: exit status 1 if a video cannot be read."""
  stride_s = window_s if stride_s is None else stride_s
  classes, results, failed = classifier.classes, [], False
  for path in videos:
    try:
      result = predict_windows(classifier, path, window_s, stride_s,
                               batch_windows)
    except Exception as error:  # PyAV raises many types; all mean unreadable
      print(f'{program}: {path}: cannot read video: '
            f'{type(error).__name__}: {error}', file=sys.stderr)
      results.append({'video': path, 'error': f'cannot read video: '
                                              f'{type(error).__name__}: '
                                              f'{error}'})
      failed = True
      continue
    written = []
    if timeline_path:
      written += write_timeline(result, classes, timeline_path)
    if overlay_path:
      written.append(write_overlay(result, classes, overlay_path))
    if as_json:
      results.append(timeline(result, classes))
    else:
      print(format_windows(result, classes, top_k), flush=True)
    for name in written:
      print(f'wrote {name}', file=sys.stderr)
  if as_json:
    print(json.dumps(results, indent=1))
  return 1 if failed else 0
