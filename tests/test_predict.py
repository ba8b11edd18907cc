"""stat_jax.deploy.predict on video files encoded here with PyAV."""

import json

import numpy as np
import pytest

import export_testlib
import video_testlib
from stat_jax.data import convert, eval_pipeline
from stat_jax import trainer
from stat_jax.deploy import export, predict

CLASSES = [f'action {i}' for i in range(12)]  # configs/tiny.py's 12


def write_video(path, num_frames=20, height=48, width=64):
  """Random grey 8x8-pixel blocks sliding right by 2 pixels a frame (grey:
  the JPEG frames of the eval shards lose little of it), at 10 fps."""
  blocks = np.random.default_rng(0).integers(0, 256, (height // 8, width // 4),
                                             dtype=np.uint8)
  pattern = blocks.repeat(8, axis=0).repeat(8, axis=1)  # [H, 2 W]
  pattern = np.stack([pattern] * 3, axis=-1)  # [H, 2 W, 3]
  frames = [pattern[:, 2 * t:2 * t + width] for t in range(num_frames)]
  video_testlib.encode(path, np.stack(frames), rate=10)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('predict')
  workdir = str(folder / 'run')
  # 2 clips x 3 crops: crops along the long side of the 4:3 video.
  config = export_testlib.save_tiny_run(workdir, CLASSES, num_clips=2,
                                        num_crops=3, eval_batch_size=1)
  video = str(folder / 'clip.mp4')
  write_video(video)
  corrupt = str(folder / 'corrupt.mp4')
  with open(corrupt, 'wb') as f:
    f.write(b'\x00\x00\x00\x18ftypmp42 not really a video' * 10)
  return {'config': config, 'workdir': workdir, 'video': video,
          'corrupt': corrupt, 'folder': folder}


def run_predict(capsys, *args):
  """(exit code, JSON results, stderr) of `python -m stat_jax.deploy.predict`."""
  code = predict.main(['--json', *args])
  out, err = capsys.readouterr()
  return code, json.loads(out), err


@pytest.fixture(scope='module')
def classifier(files):
  return predict.from_workdir(files['workdir'])


@pytest.fixture(scope='module')
def from_run(files, classifier):
  """The prediction of the checkpoint for the clip, all 12 classes ranked."""
  return predict.predict_video(classifier, files['video'], top_k=12)


def test_top1_matches_evaluation_of_the_same_clip(files, from_run):
  assert from_run['views'] == 6
  assert [entry['label'] for entry in from_run['top']] == [
      CLASSES[entry['index']] for entry in from_run['top']]
  # eval.py's path: the clip converted to a shard, its views from the eval
  # pipeline (JPEG frames), the checkpoint restored and evaluated.
  shards = convert.convert([convert.Video(files['video'], 0, CLASSES[0])],
                           CLASSES, str(files['folder'] / 'shards'), 'val', 1,
                           short_side=files['config'].data.eval_short_side)
  config = files['config'].copy_and_resolve_references()
  config.data.eval_spec = shards['spec']
  batch = next(eval_pipeline.make_eval_iterator(config))
  eval_pixels = batch['video'][batch['mask']].astype(np.float32)  # uint8
  views = predict.video_views(files['video'], config.data)
  assert views.shape == eval_pixels.shape == (6, 8, 32, 32, 3)
  assert np.abs(views - eval_pixels).mean() < 4  # JPEG loss only
  report = trainer.evaluate_checkpoint(config, files['workdir'])
  (evaluated,) = report['predictions']
  assert evaluated['views'] == 6
  assert from_run['top'][0]['index'] == evaluated['top5'][0]
  predicted = {e['index']: e['probability'] for e in from_run['top']}
  np.testing.assert_allclose([predicted[c] for c in evaluated['top5']],
                             evaluated['top5_probs'], atol=0.02)


def test_unreadable_files_are_reported_and_the_rest_predicted(
    files, classifier, capsys, monkeypatch):
  # The CLI with the module's classifier (already compiled).
  monkeypatch.setattr(predict, 'from_workdir', lambda *_: classifier)
  missing = str(files['folder'] / 'missing.webm')
  code, results, err = run_predict(capsys, f'--workdir={files["workdir"]}',
                                   files['corrupt'], missing, files['video'])
  assert code == 1
  assert [r['video'] for r in results] == [files['corrupt'], missing,
                                           files['video']]
  assert 'cannot read video' in results[0]['error']
  assert 'cannot read video' in results[1]['error']
  assert len(results[2]['top']) == 5
  assert f'{files["corrupt"]}: cannot read video' in err
  assert f'{missing}: cannot read video' in err
  assert predict.main([f'--workdir={files["workdir"]}', files['video']]) == 0
  text = capsys.readouterr().out.splitlines()
  assert text[0] == f'{files["video"]} (6 views)'
  assert len(text) == 6 and text[1].startswith('  1. ')


def test_an_export_predicts_like_the_checkpoint(files, from_run, capsys):
  out = str(files['folder'] / 'export')
  export.export_checkpoint(files['workdir'], out, ['stablehlo'])
  code, (from_export,), _ = run_predict(capsys, f'--export_dir={out}',
                                        files['video'])
  assert code == 0
  assert len(from_export['top']) == 5
  assert [e['index'] for e in from_export['top']] == [
      e['index'] for e in from_run['top'][:5]]
  np.testing.assert_allclose([e['probability'] for e in from_export['top']],
                             [e['probability'] for e in from_run['top'][:5]],
                             atol=1e-5)
  assert predict.main([f'--export_dir={out}', '--format=onnx',
                       files['video']]) == 1
  assert 'holds no onnx export; it holds stablehlo' in capsys.readouterr().err
  assert predict.main([f'--export_dir={files["folder"]}', files['video']]) == 1
  err = capsys.readouterr().err
  assert 'must be a folder written by stat_jax.deploy.export' in err
