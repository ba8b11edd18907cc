"""Per-clip phases of the pipelines: temporal sampling, decoding, cropping.

Only the sampled frames are decoded. Train decodes each frame straight into
its random crop window (`decode_and_crop_jpeg`); eval decodes whole frames,
resizes the short side and takes spatial crops.
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
