"""Per-clip phases of the pipelines: temporal sampling, decoding, cropping.

Only the sampled frames are decoded. Train decodes each frame only inside
its random crop windows (`decode_and_crop_jpeg`: the union of the windows
of the clips it gives) and resizes each window to the crop size; eval
decodes whole frames, resizes the short side and takes spatial crops.
"""

import tensorflow as tf


def segment_indices(num_frames, num_segments, fractions):
  """One frame per segment: segment i spans [i*N//T, (i+1)*N//T) (at least one
  frame), frame = start + floor(fraction_i * length). int32 [T].

  Train draws fractions ~ U[0, 1); eval uses 0.5 (the segment centre).
  """
  i = tf.range(num_segments)
  start = i * num_frames // num_segments
  length = tf.maximum((i + 1) * num_frames // num_segments - start, 1)
  offset = tf.cast(tf.floor(fractions * tf.cast(length, tf.float32)), tf.int32)
  return tf.minimum(start + tf.minimum(offset, length - 1), num_frames - 1)


def dense_indices(num_frames, num_samples, stride, start):
  """(start + stride * k) mod N for k < T: looping covers short videos."""
  return (start + stride * tf.range(num_samples)) % num_frames


def dense_slack(num_frames, num_samples, stride):
  """How far a dense span of T frames at `stride` can slide: max(N - span, 0)."""
  return tf.maximum(num_frames - ((num_samples - 1) * stride + 1), 0)


def train_indices(num_frames, data, seed):
  """int32 [T] frame indices of one random training clip."""
  if data.sampling == 'segment':
    fractions = tf.random.stateless_uniform([data.num_frames], seed)
    return segment_indices(num_frames, data.num_frames, fractions)
  if data.sampling == 'dense':
    slack = dense_slack(num_frames, data.num_frames, data.frame_stride)
    start = tf.random.stateless_uniform([], seed, 0, slack + 1, tf.int32)
    return dense_indices(num_frames, data.num_frames, data.frame_stride, start)
  raise ValueError(f"data.sampling: expected 'segment' or 'dense', got "
                   f'{data.sampling!r}')


def eval_indices(num_frames, data):
  """int32 [num_clips, T]: clips spread uniformly over the video.

  segment: clip j takes fraction (j + 0.5) / num_clips of every segment;
  dense: clip j starts at j * slack // (num_clips - 1) (one clip: slack // 2).
  """
  clips = []
  for j in range(data.num_clips):
    if data.sampling == 'segment':
      fractions = tf.fill([data.num_frames], (j + 0.5) / data.num_clips)
      clips.append(segment_indices(num_frames, data.num_frames, fractions))
    elif data.sampling == 'dense':
      slack = dense_slack(num_frames, data.num_frames, data.frame_stride)
      start = (j * slack // (data.num_clips - 1) if data.num_clips > 1
               else slack // 2)
      clips.append(dense_indices(num_frames, data.num_frames,
                                 data.frame_stride, start))
    else:
      raise ValueError(f"data.sampling: expected 'segment' or 'dense', got "
                       f'{data.sampling!r}')
  return tf.stack(clips)


def random_crop_window(image_shape, seed, area_range, aspect_range):
  """Inception-style crop [y, x, h, w] (int32) inside an [H, W, C] image."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
      area_range=area_range, aspect_ratio_range=aspect_range,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def checked_jpegs(jpegs):
  """`jpegs` once each starts with the JPEG SOI and ends with the EOI marker
  (else InvalidArgumentError): libjpeg prints to stderr for every frame it
  rejects, which floods the log when a whole shard is bad."""
  ok = tf.reduce_all(
      (tf.strings.substr(jpegs, 0, 3) == b'\xff\xd8\xff')
      & (tf.strings.substr(jpegs, -2, 2) == b'\xff\xd9'))
  with tf.control_dependencies([tf.debugging.Assert(ok, ['not a JPEG'])]):
    return tf.identity(jpegs)


def decode_frames(jpegs, count, crop_window=None):
  """uint8 [count, h, w, 3] from `count` JPEGs (all frames the same size);
  crop_window [y, x, h, w] decodes only that window of each frame."""
  frames = []
  for jpeg in tf.unstack(jpegs, num=count):
    if crop_window is None:
      frames.append(tf.io.decode_jpeg(jpeg, channels=3))
    else:
      frames.append(tf.io.decode_and_crop_jpeg(jpeg, crop_window, channels=3))
  return tf.stack(frames)


def random_resized_crops(jpegs, data, seed, count):
  """uint8 [count, T, crop, crop, 3]: `count` random resized crops of the
  T frames `jpegs` (data.area_range, aspect_range, crop_size). Each frame
  is decoded once, inside the union of the crop windows."""
  shape = tf.io.extract_jpeg_shape(jpegs[0])
  windows = tf.stack([
      random_crop_window(shape, window_seed, data.area_range,
                         data.aspect_range)
      for window_seed in tf.unstack(
          tf.random.experimental.stateless_split(seed, count))])  # [k, 4]
  start = tf.reduce_min(windows[:, :2], 0)  # [2]: y, x of the union
  end = tf.reduce_max(windows[:, :2] + windows[:, 2:], 0)
  frames = decode_frames(jpegs, data.num_frames,
                         tf.concat([start, end - start], 0))  # [T, h, w, 3]
  crops = []
  for window in tf.unstack(windows, num=count):
    y, x = window[0] - start[0], window[1] - start[1]
    crop = frames[:, y:y + window[2], x:x + window[3]]
    crops.append(tf.image.resize(crop, [data.crop_size, data.crop_size]))
  return tf.cast(tf.round(tf.stack(crops)), tf.uint8)


def resize_short_side(frames, short_side):
  """float32 [N, H', W', 3] with min(H', W') = short_side, aspect kept."""
  shape = tf.cast(tf.shape(frames)[1:3], tf.float32)
  scale = short_side / tf.reduce_min(shape)
  size = tf.cast(tf.round(shape * scale), tf.int32)
  return tf.image.resize(frames, size, method='bilinear')


def crop_offsets(length, crop, num_crops):
  """Start offsets along one side: one crop centred, three = start/centre/end."""
  if num_crops == 1:
    return [(length - crop) // 2]
  if num_crops == 3:
    return [0, (length - crop) // 2, length - crop]
  raise ValueError(f'data.num_crops: expected 1 or 3, got {num_crops}')


def spatial_crops(clips, crop, num_crops):
  """clips [C, T, H, W, 3] -> views [C * num_crops, T, crop, crop, 3], view
  index = clip * num_crops + crop; crops run along the long side."""
  height, width = tf.shape(clips)[2], tf.shape(clips)[3]
  tall = height > width
  views = []
  long_offsets = crop_offsets(tf.maximum(height, width), crop, num_crops)
  for along in long_offsets:
    y = tf.where(tall, along, (height - crop) // 2)
    x = tf.where(tall, (width - crop) // 2, along)
    views.append(clips[:, :, y:y + crop, x:x + crop, :])
  views = tf.stack(views, axis=1)  # [C, crops, T, crop, crop, 3]
  return tf.reshape(views, tf.concat([[-1], tf.shape(views)[2:]], 0))
