"""stat_jax.deploy.long_video: predict's sliding window over long videos."""

import json

import av
import numpy as np
import pytest
from PIL import Image

import export_testlib
from stat_jax.deploy import long_video, predict
from test_predict import CLASSES, write_video


def test_window_and_stride_in_frames():
  assert long_video.window_frames(10, 1.0, 0.5) == (10, 5)
  assert long_video.window_frames(29.97, 2.0, 1.0) == (60, 30)  # rounded
  assert long_video.window_frames(10, 0.01, 0.01) == (1, 1)  # at least one


@pytest.mark.parametrize('num_frames, window, stride, bounds', [
    # 3 s at 10 fps, 1 s windows every 0.5 s: the last ends at the end.
    (30, 10, 5, [(0, 10), (5, 15), (10, 20), (15, 25), (20, 30)]),
    # the stride does not divide the rest: the last window is cut to 9.
    (30, 10, 7, [(0, 10), (7, 17), (14, 24), (21, 30)]),
    (31, 10, 5, [(0, 10), (5, 15), (10, 20), (15, 25), (20, 30), (25, 31)]),
    (30, 10, 10, [(0, 10), (10, 20), (20, 30)]),
    (10, 10, 5, [(0, 10)]),  # exactly one window
    (6, 10, 5, [(0, 6)]),  # shorter than a window: the whole video
    # stride > window: gaps, and no window starts past the end.
    (30, 5, 10, [(0, 5), (10, 15), (20, 25)]),
    (22, 5, 10, [(0, 5), (10, 15), (20, 22)]),
    (0, 10, 5, []),
])
def test_window_bounds(num_frames, window, stride, bounds):
  assert long_video.window_bounds(num_frames, window, stride) == bounds


def test_nearest_window_of_each_frame():
  windows = [{'start_frame': s, 'end_frame': e}
             for s, e in long_video.window_bounds(30, 10, 5)]
  # centres 5, 10, ..., 25; frame i at i + 0.5 (7.5 and 12.5: ties, earlier)
  which = long_video.frame_windows(30, windows)
  assert which.tolist() == [0] * 8 + [1] * 5 + [2] * 5 + [3] * 5 + [4] * 7
  assert long_video.frame_windows(4, windows[:1]).tolist() == [0] * 4


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('long_video')
  workdir = str(folder / 'run')
  export_testlib.save_tiny_run(workdir, CLASSES)
  video = str(folder / 'long.mp4')
  write_video(video, num_frames=30)  # 3 s at 10 fps, 48x64
  return {'folder': folder, 'workdir': workdir, 'video': video}


def non_blank(path):
  image = np.asarray(Image.open(path).convert('RGB')).astype(np.float32)
  return image.shape[0] > 50 and image.std() > 10 and len(
      np.unique(image.reshape(-1, 3), axis=0)) > 10


def decoded(path):
  with av.open(path) as container:
    stream = container.streams.video[0]
    frames = [f.to_ndarray(format='rgb24') for f in container.decode(stream)]
    return np.stack(frames), stream.average_rate


@pytest.fixture(scope='module')
def classifier(files):
  return predict.from_workdir(files['workdir'])


def test_timeline_and_overlay(files, classifier, capsys, monkeypatch):
  monkeypatch.setattr(predict, 'from_workdir', lambda *_: classifier)
  folder = files['folder']
  timeline, overlay = str(folder / 't.json'), str(folder / 'o.mp4')
  code = predict.main([f'--workdir={files["workdir"]}', '--window_s=1',
                       '--stride_s=0.5', f'--timeline={timeline}',
                       f'--overlay={overlay}', files['video']])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert out.splitlines()[0].startswith(
      f'{files["video"]} (5 windows of 1 s every 0.5 s, 30 frames at 10 fps)')
  with open(timeline) as f:
    windows = json.load(f)['windows']
  assert [(w['start_s'], w['end_s']) for w in windows] == [
      (0, 1), (0.5, 1.5), (1, 2), (1.5, 2.5), (2, 3)]
  for w in windows:
    names, probs = zip(*w['top5'])
    assert len(names) == 5 and set(names) <= set(CLASSES)
    assert list(probs) == sorted(probs, reverse=True) and sum(probs) <= 1
  assert len({tuple(n for n, _ in w['top5']) for w in windows}) > 1
  assert non_blank(long_video.png_path(timeline))

  # The overlay: the input's frame count and rate, the labels on top.
  source, source_rate = decoded(files['video'])
  labelled, rate = decoded(overlay)
  assert labelled.shape == source.shape == (30, 48, 64, 3)
  assert rate == source_rate == 10
  corner = np.abs(labelled[:, :10, :20].astype(int) - source[:, :10, :20])
  rest = np.abs(labelled[:, 30:].astype(int) - source[:, 30:])
  assert corner.mean() > 2 * rest.mean() + 10  # text, not codec loss

  # The first window's top-5 is the model's on that window's frames (the
  # eval sampler's 8 of frames 0-9, the centre crop), batched alone.
  (_, clip), *_ = long_video.window_clips(files['video'], classifier.data,
                                          1.0, 0.5, {})
  assert clip.shape == (8, 32, 43, 3)
  views = np.zeros((8, 8, 32, 32, 3), np.uint8)  # the batch shape compiled
  views[0] = clip[:, :, 5:37]
  first = classifier.probabilities(views)[0]
  assert [n for n, _ in windows[0]['top5']] == [
      n for n, _ in long_video.top(first, CLASSES, 5)]
  np.testing.assert_allclose([p for _, p in windows[0]['top5']],
                             [p for _, p in long_video.top(first, CLASSES, 5)],
                             atol=1e-5)


def test_options_that_need_a_window(files, capsys):
  assert predict.main([f'--workdir={files["workdir"]}', '--timeline=t.json',
                       files['video']]) == 1
  assert '--timeline need(s) --window_s' in capsys.readouterr().err
  assert predict.main([f'--workdir={files["workdir"]}', '--window_s=0',
                       files['video']]) == 1
  assert 'must be > 0' in capsys.readouterr().err
  missing = files['folder'] / 'missing' / 'o.mp4'
  assert predict.main([f'--workdir={files["workdir"]}', '--window_s=1',
                       f'--overlay={missing}', files['video']]) == 1
  assert f'--overlay={missing}: no folder' in capsys.readouterr().err
