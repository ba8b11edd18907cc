"""Videos + annotations -> DMVR TFRecord shards (docs/design.md#data).

  python -m stat_jax.data.convert --videos DIR --kinetics_csv train.csv --out OUT
  python -m stat_jax.data.convert --videos DIR --ssv2_json train.json \
      --ssv2_labels labels.json --out OUT --name train
  python -m stat_jax.data.convert --videos DIR --csv list.csv --out OUT

Annotations:
  Kinetics CSV  label,youtube_id,time_start,time_end,split; the video is
                <youtube_id>_<time_start:06d>_<time_end:06d>.mp4.
  SSv2 JSON     [{"id", "template", ...}], label = template without brackets,
                index from the labels JSON {"name": "index"}; video <id>.webm.
  plain CSV     path,label (path relative to --videos; integer labels kept,
                text labels numbered in sorted order).

Frames are decoded with PyAV (any container/codec), optionally resampled to
--fps, resized to --short_side and stored as JPEG. Video i (annotation order)
goes to shard i mod --num_shards. Videos that fail to decode or have no
frames are listed with the reason in OUT/<name>-skipped.txt; the run
finishes. The label map is written to OUT/label_map.txt; when OUT already
holds one (an earlier split), its numbering is kept and a label it lacks is
refused, so every split of OUT shares one label space. --name is a plain
prefix, and nothing is written through a symbolic link.
"""

import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import multiprocessing
import os

import av
import numpy as np
import tensorflow as tf
import tqdm
from absl import flags

from stat_jax.data import dmvr
from stat_jax import cli, storage
from stat_jax.checks.errors import UserError, report_user_errors


@dataclasses.dataclass(frozen=True)
class Video:
  path: str
  label: int
  text: str
  start_us: int | None = None
  end_us: int | None = None


# -------------------------------------------------------------- annotations ---

def read_kinetics_csv(csv_path, video_dir):
  """(videos, class names) of a Kinetics-style CSV; labels sorted by name."""
  with tf.io.gfile.GFile(csv_path) as f:
    rows = list(csv.DictReader(f))
  names = sorted({row['label'] for row in rows})
  index = {name: i for i, name in enumerate(names)}
  videos = []
  for row in rows:
    start, end = int(float(row['time_start'])), int(float(row['time_end']))
    filename = f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"
    videos.append(Video(storage.join(video_dir, filename), index[row['label']],
                        row['label'], start * 1_000_000, end * 1_000_000))
  return videos, names


def ssv2_label(template):
  """'Putting [something] on [something]' -> 'Putting something on something'."""
  return template.replace('[', '').replace(']', '')


def read_ssv2_json(json_path, labels_path, video_dir):
  """(videos, class names) of an SSv2 annotation + label JSON pair."""
  with tf.io.gfile.GFile(labels_path) as f:
    label_index = {name: int(i) for name, i in json.load(f).items()}
  with tf.io.gfile.GFile(json_path) as f:
    entries = json.load(f)
  names = [''] * len(label_index)
  for name, i in label_index.items():
    names[i] = name
  videos = []
  for entry in entries:
    text = ssv2_label(entry['template'])
    if text not in label_index:
      raise ValueError(f'{json_path}: id {entry["id"]} template {text!r} is '
                       f'not in {labels_path}')
    videos.append(Video(storage.join(video_dir, f"{entry['id']}.webm"),
                        label_index[text], text))
  return videos, names


def read_plain_csv(csv_path, video_dir):
  """(videos, class names) of `path,label` rows (an optional header is
  recognised by its non-integer label in a file of integer labels)."""
  with tf.io.gfile.GFile(csv_path) as f:
    rows = [row for row in csv.reader(f) if row]
  if rows and rows[0][1].strip().lower() == 'label':
    rows = rows[1:]
  labels = [row[1].strip() for row in rows]
  if all(label.lstrip('-').isdigit() for label in labels):
    numbers = [int(label) for label in labels]
    names = [str(i) for i in range(max(numbers, default=-1) + 1)]
  else:
    names = sorted(set(labels))
    numbers = [names.index(label) for label in labels]
  videos = [Video(storage.join(video_dir, row[0].strip()), number, label)
            for row, number, label in zip(rows, numbers, labels)]
  return videos, names


# ----------------------------------------------------------------- decoding ---

def _resized_size(width, height, short_side):
  scale = short_side / min(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


@contextlib.contextmanager
def open_video(path):
  """The PyAV container of a video file, local or gs://."""
  if not storage.is_remote(path):  # PyAV reads local files itself
    with av.open(path) as container:
      yield container
    return
  with tf.io.gfile.GFile(path, 'rb') as source, av.open(source) as container:
    yield container


def decode_video(path, short_side, fps=0.0):
  """uint8 [N, H, W, 3] frames, short side resized; fps > 0 resamples."""
  frames, next_time = [], 0.0
  with open_video(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    for frame in container.decode(stream):
      if fps > 0:
        time = frame.time if frame.time is not None else next_time
        if time + 1e-6 < next_time:
          continue
        next_time += 1.0 / fps
      width, height = _resized_size(frame.width, frame.height, short_side)
      frames.append(frame.to_ndarray(width=width, height=height,
                                     format='rgb24'))
  if not frames:
    raise ValueError('no frames')
  return np.stack(frames)


def convert_video(video, short_side, quality, fps):
  """(serialized SequenceExample, None) or (None, reason)."""
  try:
    frames = decode_video(video.path, short_side, fps)
  except Exception as e:  # PyAV raises many error types; all mean "skip"
    return None, f'{type(e).__name__}: {e}'.replace('\n', ' ')
  example = dmvr.make_example(
      dmvr.encode_frames(frames, quality), video.label, video.text,
      storage.basename(video.path), video.start_us, video.end_us)
  return example.SerializeToString(), None


def _convert_star(args):
  return convert_video(*args)


# ------------------------------------------------------------------ writing ---

def check_name(name: str) -> str:
  """A shard prefix that stays inside --out: no separator, no '..'."""
  if (not name or '/' in name or os.sep in name or '..' in name
      or (os.altsep and os.altsep in name)):
    raise UserError(f'--name {name!r}: give a plain name (no path separators, '
                     "no '..'), e.g. train or val")
  return name


def _not_a_link(out_dir, path):
  """`path` unless it is a symbolic link (writing would follow it, maybe
  outside `out_dir`)."""
  if not storage.is_remote(path) and os.path.islink(path):
    raise UserError(f'{path} is a symbolic link (to {os.readlink(path)}); '
                     f'refusing to write through it: --out {out_dir} must '
                     'hold plain files')
  return path


def _numbered(videos, names, out_dir):
  """(videos, names) numbered by OUT/label_map.txt if it exists (written
  otherwise): an earlier split's numbering is kept, never renumbered."""
  path = _not_a_link(out_dir, storage.join(out_dir, 'label_map.txt'))
  if not tf.io.gfile.exists(path):
    dmvr.write_label_map(path, names)
    return videos, names
  existing = dmvr.load_label_map(path)
  if existing == list(names):
    return videos, names
  index = {name: i for i, name in enumerate(existing)}
  unknown = sorted({names[v.label] for v in videos} - set(index))
  if unknown:
    raise UserError(
        f'label(s) {", ".join(map(repr, unknown))} are not in {path} '
        f'({len(existing)} classes, from an earlier split); convert the split '
        'with the most classes first, or use another --out')
  return [dataclasses.replace(v, label=index[names[v.label]])
          for v in videos], existing


def convert(videos, names, out_dir, name='train', num_shards=16,
            short_side=256, quality=90, fps=0.0, workers=1) -> dict:
  """Writes shards, label_map.txt and <name>-skipped.txt; a summary dict."""
  check_name(name)
  try:
    storage.write_probe(out_dir)
  except (OSError, tf.errors.OpError) as error:
    raise UserError(f'--out {out_dir} is not writable '
                    f'({storage.reason(error)})') from error
  num_shards = max(1, min(num_shards, len(videos)))
  for path in dmvr.sharded_filenames(storage.join(out_dir, f'{name}.tfrecord'),
                                     num_shards):
    _not_a_link(out_dir, path)
  skipped_path = _not_a_link(out_dir,
                             storage.join(out_dir, f'{name}-skipped.txt'))
  videos, names = _numbered(videos, names, out_dir)
  jobs = [(video, short_side, quality, fps) for video in videos]
  skipped = 0
  with dmvr.ShardedWriter(storage.join(out_dir, f'{name}.tfrecord'),
                          num_shards) as writer, tf.io.gfile.GFile(
                              skipped_path, 'w') as log:
    log.write('')  # GFile creates the file at its first write: none may come
    for i, (record, reason) in enumerate(tqdm.tqdm(
        _run(jobs, workers), total=len(jobs), desc=f'converting {name}')):
      if record is None:
        skipped += 1
        log.write(f'{videos[i].path}\t{reason}\n')
      else:
        writer.write(i % num_shards, record)
  return {'spec': writer.spec, 'converted': len(videos) - skipped,
          'skipped': skipped, 'skipped_list': skipped_path}


def _run(jobs, workers):
  """Results in job order; `workers` > 1 uses spawned processes."""
  if workers <= 1:
    yield from map(_convert_star, jobs)
    return
  context = multiprocessing.get_context('spawn')  # TF is not fork-safe
  with concurrent.futures.ProcessPoolExecutor(workers,
                                              mp_context=context) as pool:
    yield from pool.map(_convert_star, jobs, chunksize=4)


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('videos', None, 'Folder of the videos.', flag_values=FLAGS,
                    required=True)
flags.DEFINE_string('kinetics_csv', None, 'Kinetics annotation CSV.',
                    flag_values=FLAGS)
flags.DEFINE_string('ssv2_json', None, 'SSv2 annotation JSON.',
                    flag_values=FLAGS)
flags.DEFINE_string('csv', None, 'Plain path,label CSV.', flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(['kinetics_csv', 'ssv2_json', 'csv'],
                                     required=True, flag_values=FLAGS)
flags.DEFINE_string('ssv2_labels', None, 'SSv2 label JSON {name: index}.',
                    flag_values=FLAGS)
flags.register_multi_flags_validator(
    ['ssv2_json', 'ssv2_labels'],
    lambda given: not given['ssv2_json'] or given['ssv2_labels'],
    '--ssv2_json needs --ssv2_labels', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Output folder.', flag_values=FLAGS,
                    required=True)
flags.DEFINE_string('name', 'train', 'Shard file prefix.', flag_values=FLAGS)
flags.DEFINE_integer('num_shards', 16, 'Shards to write.', flag_values=FLAGS)
flags.DEFINE_integer('short_side', 256, '256 (default) or e.g. 320.',
                     flag_values=FLAGS)
flags.DEFINE_integer('quality', 90, 'JPEG quality.', flag_values=FLAGS)
flags.DEFINE_float('fps', 0.0, 'Frame rate to resample to; 0 keeps all.',
                   flag_values=FLAGS)
flags.DEFINE_integer('workers', os.cpu_count(), 'Decoding processes.',
                     flag_values=FLAGS)


def _annotations():
  """(videos, class names) of the annotation flag given."""
  if FLAGS.kinetics_csv:
    return read_kinetics_csv(FLAGS.kinetics_csv, FLAGS.videos)
  if FLAGS.ssv2_json:
    return read_ssv2_json(FLAGS.ssv2_json, FLAGS.ssv2_labels, FLAGS.videos)
  return read_plain_csv(FLAGS.csv, FLAGS.videos)


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('stat_jax.data.convert', _convert)


def _convert() -> int:
  videos, names = _annotations()
  summary = convert(videos, names, FLAGS.out, FLAGS.name, FLAGS.num_shards,
                    FLAGS.short_side, FLAGS.quality, FLAGS.fps, FLAGS.workers)
  print(f"converted {summary['converted']} videos, skipped "
        f"{summary['skipped']} (see {summary['skipped_list']}) -> "
        f"{summary['spec']}")
  return 0


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
