"""gs:// end to end, against the GCS emulator of tests/gcs_emulator.py (the
`gcs` fixture): the converter writes shards to a bucket; a tiny run trains
from gs:// shards into a gs:// workdir, is SIGKILLed and resumes bit for
bit; eval, export and predict read that run; nothing lands in the working
directory; a corrupt latest checkpoint is moved aside in the bucket; a
missing bucket, missing credentials and a denied write are refused in one
line before anything compiles.

Slow (training subprocesses, an export): CI's second step (ci_extra).
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT
from stat_jax.data import convert, dmvr, synthetic
from stat_jax import checkpoint, explain, trainer
from stat_jax.deploy import export, predict
from stat_jax.train_state import abstract_train_state, with_shardings
from stat_jax.transfer import load_pretrained
from training_testlib import STEPS, run_config
import video_testlib

pytestmark = pytest.mark.ci_extra

BUCKET = 'gs://test-bucket'


def read_loss_log(workdir):
  losses = {}
  with tf.io.gfile.GFile(f'{workdir}/train_log.jsonl') as f:
    for line in f:
      entry = json.loads(line)
      losses[entry['step']] = entry['loss']
  return losses


@pytest.fixture(scope='module')
def gs_motion(gcs, motion):
  """The motion set's shards and label map, copied to the bucket: the
  dict of `motion` with gs:// specs."""
  copied = {}
  for split in ('train', 'val'):
    files = dmvr.resolve_spec(motion[split])
    for path in files:
      tf.io.gfile.copy(path, f'{BUCKET}/motion/{os.path.basename(path)}')
    copied[split] = f'{BUCKET}/motion/{split}.tfrecord@{len(files)}'
  copied['label_map'] = f'{BUCKET}/motion/label_map.txt'
  tf.io.gfile.copy(motion['label_map'], copied['label_map'])
  return copied


def train_command(data, workdir):
  return [sys.executable, os.path.join(ROOT, 'train.py'),
          f'--config={os.path.join(ROOT, "configs", "tiny.py")}',
          f'--workdir={workdir}', f'--config.total_steps={STEPS}',
          '--config.checkpoint_every=3', '--config.eval_every=1000',
          '--config.log_every=1', f'--config.data.train_spec={data["train"]}',
          f'--config.data.eval_spec={data["val"]}',
          f'--config.data.label_map={data["label_map"]}',
          '--config.data.eval_batch_size=4']


def wait_for_object(path, process, seconds=300):
  deadline = time.time() + seconds
  while not tf.io.gfile.exists(path):
    assert time.time() < deadline and process.poll() is None, path
    time.sleep(0.5)


@pytest.fixture(scope='module')
def empty_cwd(tmp_path_factory):
  return str(tmp_path_factory.mktemp('empty_cwd'))


@pytest.fixture(scope='module')
def gs_run(gcs, gs_motion, empty_cwd):
  """train.py from gs:// shards into gs://test-bucket/run, started in an
  empty folder, SIGKILLed once checkpoint 3 is committed, run again to the
  end. The workdir and the killed run's exit status."""
  workdir = f'{BUCKET}/run'
  command = train_command(gs_motion, workdir)
  killed = subprocess.Popen(command, cwd=empty_cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  # orbax writes commit_success.txt once a step is whole on GCS
  wait_for_object(f'{workdir}/checkpoints/3/commit_success.txt', killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  resumed = subprocess.run(command, cwd=empty_cwd, capture_output=True,
                           text=True, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return {'workdir': workdir, 'killed_status': killed.returncode,
          'resumed_output': resumed.stdout + resumed.stderr}


@pytest.fixture(scope='module')
def local_run(motion, tmp_path_factory):
  """The same run on the local motion set, without a stop: the reference."""
  workdir = str(tmp_path_factory.mktemp('local_run'))
  return trainer.train_and_evaluate(run_config(motion), workdir)


def test_converter_writes_shards_to_a_bucket(gcs, tmp_path):
  """Videos and list in a bucket -> shards in a bucket, the same records as
  converting local copies of the same files."""
  local = tmp_path / 'videos'
  local.mkdir()
  rng = np.random.default_rng(0)
  for name in ('a.mp4', 'b.mp4', 'c.mp4'):
    video_testlib.encode(str(local / name),
                         rng.integers(0, 256, (6, 32, 48, 3), np.uint8), 10)
  (local / 'list.csv').write_text('a.mp4,jump\nb.mp4,run\nc.mp4,jump\n')
  for path in local.iterdir():
    tf.io.gfile.copy(str(path), f'{BUCKET}/videos/{path.name}')
  args = ['--num_shards=2', '--short_side=24', '--workers=1']
  assert convert.main([f'--videos={BUCKET}/videos', f'--out={BUCKET}/converted',
                       f'--csv={BUCKET}/videos/list.csv', *args]) == 0
  assert convert.main([f'--videos={local}', f'--out={tmp_path}/converted',
                       f'--csv={local}/list.csv', *args]) == 0
  objects = set(gcs.list_objects('test-bucket', 'converted/'))
  expected = {'label_map.txt', 'train-skipped.txt',
              'train.tfrecord-00000-of-00002', 'train.tfrecord-00001-of-00002'}
  assert {f'converted/{name}' for name in expected} <= objects
  for name in expected:
    with tf.io.gfile.GFile(f'{BUCKET}/converted/{name}', 'rb') as remote:
      assert remote.read() == (tmp_path / 'converted' / name).read_bytes(), name


def test_a_run_resumes_bit_for_bit_from_a_bucket(gs_run, local_run, motion):
  assert gs_run['killed_status'] == -signal.SIGKILL
  assert 'Resuming from step' in gs_run['resumed_output']
  assert read_loss_log(gs_run['workdir']) == local_run['losses']
  reference = local_run['state'].params
  zeros = jax.tree.map(jnp.zeros_like, reference)
  restored = load_pretrained(gs_run['workdir'], zeros, log=lambda _: None)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_run_is_in_the_bucket_and_the_working_directory_empty(
    gcs, gs_run, empty_cwd):
  objects = gcs.list_objects('test-bucket', 'run/')
  assert 'run/train_log.jsonl' in objects
  assert any(name.startswith('run/tensorboard/') and '.tfevents.' in name
             for name in objects)
  assert f'run/checkpoints/{STEPS}/commit_success.txt' in objects
  assert os.listdir(empty_cwd) == []


def test_eval_export_and_predict_read_the_run(gcs, gs_motion, gs_run,
                                              empty_cwd, monkeypatch, capsys):
  monkeypatch.chdir(empty_cwd)
  workdir = gs_run['workdir']
  result = trainer.evaluate_checkpoint(run_config(gs_motion), workdir)
  report = json.loads(tf.io.gfile.GFile(
      f'{workdir}/eval_step{STEPS}.json').read())
  assert report['checkpoint_step'] == STEPS
  assert report['top1'] == result['top1']
  out = f'{BUCKET}/export'
  assert export.main([f'--workdir={workdir}', f'--out={out}',
                      '--formats=stablehlo,onnx']) == 0
  assert export.main([f'--workdir={workdir}', f'--out={out}',
                      '--formats=onnx']) == 1  # exists: refused
  video = f'{BUCKET}/videos/clip.mp4'
  local_video = os.path.join(gcs.folder, 'clip.mp4')
  video_testlib.encode(local_video, np.random.default_rng(1).integers(
      0, 256, (20, 48, 64, 3), np.uint8), 10)
  tf.io.gfile.copy(local_video, video, overwrite=True)
  capsys.readouterr()
  probabilities = {}
  for source in ([f'--workdir={workdir}'], [f'--export_dir={out}',
                                            '--format=onnx'],
                 [f'--export_dir={out}', '--format=stablehlo']):
    assert predict.main(['--json', *source, video]) == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    probabilities[source[-1]] = [entry['probability'] for entry in top]
  first, *others = probabilities.values()
  for other in others:
    np.testing.assert_allclose(other, first, atol=1e-4)
  assert os.listdir(empty_cwd) == []


def test_explain_reads_a_record_in_the_bucket_and_writes_pictures_there(
    gcs, gs_run, capsys):
  shard = dmvr.resolve_spec(f'{BUCKET}/motion/val.tfrecord@1')[0]
  assert explain.main([f'--workdir={gs_run["workdir"]}',
                       f'--out={BUCKET}/explain', '--json', f'{shard}:1']) == 0
  video = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[
      'videos'][0]
  assert video['label'] == synthetic.CLASSES[synthetic.clip_label(1)]
  objects = gcs.list_objects('test-bucket', 'explain/')
  pictures = [name for name in objects if name.endswith('.png')]
  assert {name.split('.')[-2] for name in pictures} == {
      'frames', 'shares', 'timeline', 'spatial'}
  for name in pictures:
    png = tf.io.gfile.GFile(f'{BUCKET}/{name}', 'rb').read()
    assert tf.io.decode_png(png).numpy().std() > 10, name  # not blank
  page = tf.io.gfile.GFile(f'{BUCKET}/explain/index.html').read()
  assert all(name.removeprefix('explain/') in page for name in pictures)


@pytest.mark.parametrize('workdir, credentials, says', [
    ('gs://no-such-bucket/run', True, 'Not Found'),
    ('gs://read-only-bucket/run', True, 'does not have storage.objects.create'),
    (f'{BUCKET}/no-credentials', False, 'Anonymous caller'),
])
def test_unusable_workdirs_are_refused_in_one_line(gcs, motion, empty_cwd,
                                                   workdir, credentials, says):
  env = dict(os.environ)
  if not credentials:
    del env['GOOGLE_AUTH_TOKEN_FOR_TESTING']
  done = subprocess.run(train_command(motion, workdir), cwd=empty_cwd,
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  errors = [line for line in done.stderr.splitlines()
            if line.startswith('train.py: ')]
  assert len(errors) == 1, done.stderr[-2000:]
  assert f'train.py: {workdir} is not writable (' in errors[0]
  assert says in errors[0]
  assert 'Compiled' not in done.stdout + done.stderr  # refused before
  bucket, _, folder = workdir.removeprefix('gs://').partition('/')
  if bucket != 'no-such-bucket':
    assert gcs.list_objects(bucket, folder) == []
  assert os.listdir(empty_cwd) == []


def test_a_corrupt_latest_in_a_bucket_is_moved_aside(gcs, gs_motion, gs_run,
                                                     capfd):
  """Last in this module: it changes the run."""
  workdir = gs_run['workdir']
  tf.io.gfile.remove(f'{workdir}/checkpoints/{STEPS}/state/_METADATA')
  config = run_config(gs_motion)
  _, _, abstract, shardings = abstract_train_state(
      config, trainer.sharding.make_mesh(config))
  abstract = with_shardings(abstract, shardings)
  ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), 2)
  capfd.readouterr()
  step, _ = ckpt.newest_whole('latest', lambda s: ckpt.restore_state(
      s, abstract), move_aside=True)
  ckpt.close()
  assert step == STEPS - 3  # the step saved before
  err = capfd.readouterr().err
  assert f'moved the unreadable checkpoint step {STEPS} to ' \
         f'{workdir}/checkpoints/{STEPS}.corrupt' in err
  objects = gcs.list_objects('test-bucket', 'run/checkpoints/')
  assert f'run/checkpoints/{STEPS}.corrupt/commit_success.txt' in objects
  assert not [name for name in objects
              if name.startswith(f'run/checkpoints/{STEPS}/')]
