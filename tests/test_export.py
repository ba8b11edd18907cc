"""stat_jax.deploy.export: every format reproduces the JAX model of a checkpoint."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
import safetensors.numpy
from flax import nnx

import export_testlib
from stat_jax import param_names
from stat_jax.deploy import export, inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4  # float32 logits, absolute


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run'))
  export_testlib.save_tiny_run(workdir)
  return workdir


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('exports') / 'tiny')
  assert export.main([f'--workdir={run}', f'--out={out}']) == 0
  return out


@pytest.fixture(scope='module')
def restored(run):
  return inference.restore(run)


@pytest.fixture(scope='module')
def cases(exported, restored):
  """[(uint8 video, JAX logits)]: the example (batch 2) and a batch of 3
  random 8x8-pixel block patterns."""
  example = np.load(os.path.join(exported, 'example_input.npy'))
  blocks = np.random.default_rng(1).integers(0, 256, (3, 8, 4, 4, 3),
                                             dtype=np.uint8)
  other = blocks.repeat(8, axis=2).repeat(8, axis=3)  # [3, 8, 32, 32, 3]
  return [(video, np.asarray(restored.classify(video)[0]))
          for video in (example, other)]


def test_manifest_examples_and_a_single_complete_folder(exported, restored):
  with open(os.path.join(exported, 'manifest.json')) as f:
    manifest = json.load(f)
  assert list(manifest['formats']) == list(export.FORMATS)
  assert manifest['checkpoint']['step'] == export_testlib.STEP
  assert manifest['classes'] == [str(i) for i in range(12)]
  assert manifest['input']['shape'] == ['batch', 8, 32, 32, 3]
  assert manifest['formats']['onnx']['opset'] == export.ONNX_OPSET
  assert manifest['versions']['jax'] == jax.__version__
  example = np.load(os.path.join(exported, 'example_input.npy'))
  assert example.dtype == np.uint8 and example.shape == (2, 8, 32, 32, 3)
  example_logits = np.load(os.path.join(exported, 'example_logits.npy'))
  np.testing.assert_allclose(example_logits, restored.classify(example)[0],
                             atol=1e-6)
  assert os.listdir(os.path.dirname(exported)) == ['tiny']  # no staging left


SAVEDMODEL_SCRIPT = r'''
import json, sys
import numpy as np

class NoJax:
  """Makes `import jax` fail, as on a machine with TensorFlow alone."""
  def find_spec(self, name, path=None, target=None):
    if name.partition('.')[0] in ('jax', 'jaxlib', 'flax'):
      raise ImportError(f'{name} is blocked in this process')

sys.meta_path.insert(0, NoJax())
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']
for i, path in enumerate(sys.argv[2:]):
  outputs = serve(video=tf.constant(np.load(path)))
  np.save(f'{path}.logits.npy', outputs['logits'].numpy())
  np.save(f'{path}.probabilities.npy', outputs['probabilities'].numpy())
print(json.dumps({'jax_imported': 'jax' in sys.modules}))
'''


def test_savedmodel_reproduces_the_logits_without_jax(exported, cases,
                                                      tmp_path):
  inputs = []
  for i, (video, _) in enumerate(cases):
    inputs.append(str(tmp_path / f'input{i}.npy'))
    np.save(inputs[-1], video)
  result = subprocess.run(
      [sys.executable, '-c', SAVEDMODEL_SCRIPT,
       os.path.join(exported, 'savedmodel'), *inputs],
      cwd=ROOT, capture_output=True, text=True, check=True)
  assert json.loads(result.stdout.strip().splitlines()[-1]) == {
      'jax_imported': False}
  for path, (video, logits) in zip(inputs, cases):
    np.testing.assert_allclose(np.load(f'{path}.logits.npy'), logits,
                               atol=TOLERANCE)
    np.testing.assert_allclose(np.load(f'{path}.probabilities.npy').sum(-1),
                               1.0, atol=1e-5)


def test_onnx_reproduces_the_logits_in_onnxruntime(exported, cases):
  path = os.path.join(exported, 'model.onnx')
  model = onnx.load(path)
  opsets = {o.domain: o.version for o in model.opset_import}
  assert opsets[''] == export.ONNX_OPSET
  batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
  assert batch_dim.dim_param == 'batch'
  session = onnxruntime.InferenceSession(
      path, providers=['CPUExecutionProvider'])
  for video, logits in cases:
    onnx_logits, probabilities = session.run(None, {'video': video})
    np.testing.assert_allclose(onnx_logits, logits, atol=TOLERANCE)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)


def test_stablehlo_reloads_with_a_symbolic_batch(exported, cases):
  with open(os.path.join(exported, 'model.stablehlo'), 'rb') as f:
    reloaded = jax.export.deserialize(bytearray(f.read()))
  assert str(reloaded.in_avals[0].shape[0]) == 'batch'
  assert reloaded.platforms == export.PLATFORMS
  for video, logits in cases:
    np.testing.assert_allclose(reloaded.call(video)[0], logits, atol=TOLERANCE)
  with pytest.raises(Exception, match='shape'):
    reloaded.call(cases[0][0][:, :4])  # 4 frames: not the exported T = 8


def test_safetensors_round_trip_names_shapes_and_logits(exported, restored,
                                                        cases):
  path = os.path.join(exported, 'params.safetensors')
  tensors = safetensors.numpy.load_file(path)
  state = {param_names.name_of(p): v.get_value()
           for p, v in nnx.to_flat_state(restored.params)}
  assert sorted(tensors) == sorted(state)
  assert 'blocks.1.attn.qkv.kernel' in tensors
  for name, value in state.items():
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)
  with open(os.path.join(exported, 'params.json')) as f:
    index = json.load(f)
  assert {n: tuple(t['shape']) for n, t in index['tensors'].items()} == {
      n: v.shape for n, v in tensors.items()}
  assert index['tensors']['head.kernel']['layout'].startswith('[in, out]')
  assert index['config']['model']['num_classes'] == 12

  abstract = restored.parts.abstract_params
  loaded = param_names.load_safetensors(path, abstract)
  for video, logits in cases:
    np.testing.assert_allclose(restored.apply(loaded, video)[0], logits,
                               atol=1e-6)
  tensors['head.kernel'] = tensors['head.kernel'][:, :5]
  with pytest.raises(ValueError, match=r'head.kernel has shape \(128, 5\)'):
    param_names.from_named_arrays(tensors, abstract, path)
  del tensors['norm.scale']
  with pytest.raises(KeyError, match=r"missing \['norm.scale'\]"):
    param_names.from_named_arrays(tensors, abstract, path)


def test_missing_checkpoint_and_bad_format_are_refused(run, tmp_path, capsys):
  out = str(tmp_path / 'out')
  assert export.main([f'--workdir={tmp_path / "nowhere"}', f'--out={out}']) == 1
  assert 'no checkpoints in' in capsys.readouterr().err
  assert export.main([f'--workdir={run}', '--checkpoint=7',
                      f'--out={out}']) == 1
  assert "no checkpoint '7'" in capsys.readouterr().err
  assert export.main([f'--workdir={run}', '--formats=onnx,tflite',
                      f'--out={out}']) == 1
  assert "unknown export format(s) 'tflite'" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []
  os.mkdir(out)  # an existing folder is never overwritten
  assert export.main([f'--workdir={run}', f'--out={out}']) == 1
  assert 'exists; remove it or choose another' in capsys.readouterr().err


def test_a_failed_export_leaves_no_folder(run, restored, tmp_path,
                                          monkeypatch):
  def failing_writer(_, folder):
    with open(os.path.join(folder, 'model.stablehlo'), 'wb') as f:
      f.write(b'half of it')
    raise OSError('disk full')

  monkeypatch.setitem(export.FORMATS, 'stablehlo', failing_writer)
  monkeypatch.setattr(inference, 'restore', lambda *_: restored)  # compiled
  with pytest.raises(RuntimeError, match='stablehlo export of checkpoint '
                                         'step 5 failed: OSError: disk full'):
    export.export_checkpoint(run, str(tmp_path / 'out'),
                             ['safetensors', 'stablehlo'])
  assert os.listdir(tmp_path) == []
