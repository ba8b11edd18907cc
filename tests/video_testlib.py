"""Writes small video files with PyAV for the tests that read real video."""

import av
import numpy as np


def encode(path: str, frames: np.ndarray, rate: int, codec: str = 'mpeg4'):
  """frames: uint8 RGB [T, H, W, 3] (even H and W) -> a video file at `rate`
  frames per second."""
  _, height, width, _ = frames.shape
  with av.open(path, 'w') as container:
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, 'yuv420p'
    for frame in frames:
      image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame),
                                         format='rgb24')
      for packet in stream.encode(image):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
