"""MViT-B weights from PyTorch: torchvision's MViT (its own class, random
weights) saved as a state dict, imported by stat_jax.deploy.import_torch,
gives torchvision's logits (predict --clip_npy); so does the same state
dict under PySlowFast's names and as safetensors; a wrong mapping of any
one tensor does not; a pickle that would run code is refused.

torch is the package's `torch` extra (pyproject.toml): these are ci_extra.
"""

import json
import os
import pickle
import re
import sys

import numpy as np
import pytest

from conftest import ROOT
from stat_jax import param_names
from stat_jax.deploy import import_torch, inference, predict
from mvit_testlib import run_import, run_tool

# triton, the GPU kernel compiler of CUDA builds of torch, crashes the
# process when imported after TensorFlow (both bundle LLVM); torchvision
# imports it only to ask whether it is there, and these checks run on CPU.
sys.modules.setdefault('triton', None)
torch = pytest.importorskip('torch')
tv_mvit = pytest.importorskip('torchvision.models.video.mvit')

pytestmark = pytest.mark.ci_extra

# Our tiny MViT (mvit_testlib), block by block in torchvision's terms.
_TINY_BLOCKS = (  # heads, width in, width out, Q stride, K/V stride
    (1, 16, 32, (), (1, 4, 4)),
    (2, 32, 64, (1, 2, 2), (1, 2, 2)),
    (2, 64, 128, (1, 2, 2), (1, 1, 1)),
    (4, 128, 128, (1, 2, 2), (1, 1, 1)),
)
# torchvision -> PySlowFast, as the two codebases name the same tensors.
_PYSLOWFAST_NAMES = (
    (r'^conv_proj\.', 'patch_embed.proj.'),
    (r'^pos_encoding\.class_token$', 'cls_token'),
    (r'^pos_encoding\.(spatial|temporal|class)_pos$', r'pos_embed_\1'),
    (r'\.attn\.project\.0\.', '.attn.proj.'),
    (r'\.attn\.pool_([qkv])\.pool\.', r'.attn.pool_\1.'),
    (r'\.attn\.pool_([qkv])\.norm_act\.0\.', r'.attn.norm_\1.'),
    (r'\.mlp\.0\.', '.mlp.fc1.'),
    (r'\.mlp\.3\.', '.mlp.fc2.'),
    (r'^(blocks\.\d+)\.project\.', r'\1.proj.'),
    (r'^head\.1\.', 'head.projection.'),
)


def tiny_torchvision_mvit():
  """torchvision's MViT v1 class at the tiny layout, every parameter random
  (LayerNorms too, so that a mis-mapped one shows)."""
  blocks = [tv_mvit.MSBlockConfig(
      num_heads=heads, input_channels=width_in, output_channels=width_out,
      kernel_q=[3, 3, 3] if q_stride else [], kernel_kv=[3, 3, 3],
      stride_q=list(q_stride), stride_kv=list(kv_stride))
            for heads, width_in, width_out, q_stride, kv_stride in _TINY_BLOCKS]
  torch.manual_seed(0)
  model = tv_mvit.MViT(spatial_size=(32, 32), temporal_size=8,
                       block_setting=blocks, residual_pool=False,
                       residual_with_cls_embed=False, rel_pos_embed=False,
                       proj_after_attn=False, num_classes=12)
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      # LayerNorm scales around 1: attention neither uniform nor saturated.
      scale = 'norm' in name and name.endswith('weight') and tensor.ndim == 1
      tensor.copy_(torch.randn_like(tensor) * (0.3 if scale else 0.2) + scale)
  return model.eval()


def torch_logits(model, clip):
  """clip: float32 [B, T, H, W, 3] -> torchvision's logits [B, classes]."""
  with torch.no_grad():
    video = torch.from_numpy(clip).permute(0, 4, 1, 2, 3)  # [B, 3, T, H, W]
    return model(video).numpy()


def pyslowfast_state(state: dict) -> dict:
  """A torchvision MViT state dict under PySlowFast's names and shapes."""
  renamed = {}
  for name, tensor in state.items():
    for pattern, replacement in _PYSLOWFAST_NAMES:
      name = re.sub(pattern, replacement, name)
    if name in ('cls_token', 'pos_embed_class'):
      tensor = tensor.reshape(1, 1, -1)
    elif name.startswith('pos_embed_'):
      tensor = tensor[None]
    renamed[name] = tensor
  return renamed


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The tiny torchvision MViT saved as a .pth, a clip, and its logits."""
  folder = tmp_path_factory.mktemp('torch')
  model = tiny_torchvision_mvit()
  clip = np.random.default_rng(0).normal(size=(2, 8, 32, 32, 3)).astype(np.float32)
  np.save(folder / 'clip.npy', clip)
  torch.save(model.state_dict(), folder / 'mvit.pth')
  return {'folder': folder, 'model': model, 'clip': clip,
          'logits': torch_logits(model, clip)}


@pytest.fixture(scope='module')
def imported(reference):
  out = reference['folder'] / 'run'
  status, stdout, stderr = run_import(reference['folder'] / 'mvit.pth', out)
  assert status == 0, stderr
  assert 'wrote' in stdout
  return inference.restore(str(out))


def test_torchvision_logits_through_predict_clip_npy(reference, imported):
  status, stdout, stderr = run_tool(
      predict, f'--workdir={reference["folder"] / "run"}',
      f'--clip_npy={reference["folder"] / "clip.npy"}', '--json')
  assert status == 0, stderr
  logits = np.array(json.loads(stdout)['logits'], np.float32)
  np.testing.assert_allclose(logits, reference['logits'], atol=1e-4, rtol=0)


def test_a_wrong_mapping_of_any_one_tensor_changes_the_logits(reference,
                                                               imported):
  apply = predict.logits_fn(imported.parts)
  arrays = param_names.named_arrays(imported.params)
  abstract = imported.parts.abstract_params
  off = []
  for name, array in arrays.items():
    wrong = dict(arrays, **{name: array.ravel()[::-1].reshape(array.shape)})
    params = param_names.from_named_arrays(wrong, abstract, 'wrong')
    logits = np.asarray(apply(params, reference['clip']))
    if np.abs(logits - reference['logits']).max() <= 1e-4:
      off.append(name)
  # What cannot change the logits: a shift of all keys (the K norm's bias)
  # leaves the softmax as it is, and the last block's Q pooling conv pools
  # only patch tokens, which the head never reads. Those are checked
  # against the torch tensors themselves.
  assert off == [f'blocks.{i}.attn.pool_k.norm.bias' for i in range(4)] + [
      'blocks.3.attn.pool_q.conv.kernel']
  state = reference['model'].state_dict()
  for i in range(4):
    np.testing.assert_array_equal(
        arrays[f'blocks.{i}.attn.pool_k.norm.bias'],
        state[f'blocks.{i}.attn.pool_k.norm_act.0.bias'].numpy())
  np.testing.assert_array_equal(  # torch [out, 1, t, h, w] -> [t, h, w, 1, out]
      arrays['blocks.3.attn.pool_q.conv.kernel'],
      state['blocks.3.attn.pool_q.pool.weight'].numpy().transpose(2, 3, 4, 1, 0))


def test_pyslowfast_names_and_safetensors_import_the_same(reference, imported,
                                                         tmp_path):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  state = reference['model'].state_dict()
  pyth = tmp_path / 'mvit.pyth'
  torch.save({'epoch': 200, 'model_state': pyslowfast_state(state),
              'cfg': 'MODEL: {ARCH: mvit}'}, pyth)
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                              tmp_path / 'mvit.safetensors')
  expected = param_names.named_arrays(imported.params)
  for checkpoint, fmt in ((pyth, 'pyslowfast'),
                          (tmp_path / 'mvit.safetensors', 'torchvision')):
    out = tmp_path / fmt
    status, _, stderr = run_import(checkpoint, out, fmt)
    assert status == 0, stderr
    got = param_names.named_arrays(inference.restore(str(out)).params)
    assert got.keys() == expected.keys()
    for name, array in expected.items():
      np.testing.assert_array_equal(got[name], array, err_msg=name)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch ran_code',))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  zipped, plain = tmp_path / 'zipped.pth', tmp_path / 'plain.pth'
  torch.save({'conv_proj.weight': torch.zeros(1), 'x': _RunsCode()}, zipped)
  plain.write_bytes(pickle.dumps({'x': _RunsCode()}, protocol=2))
  text = tmp_path / 'notes.pth'
  text.write_text('not a checkpoint\n')
  for path, error in ((zipped, 'refused, it holds more than tensors'),
                      (plain, 'refused, it holds more than tensors'),
                      (text, 'not a PyTorch checkpoint')):
    status, _, stderr = run_import(path, tmp_path / 'out')
    assert status == 1
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert f'{path}: {error}' in stderr
  assert not (tmp_path / 'ran_code').exists()
  assert not (tmp_path / 'out').exists()


def test_torchvisions_mvit_v1_b_at_16x224(tmp_path):
  """The full MViT-B 16x4 (torchvision's mvit_v1_b, random init) imported
  with configs/mvit_b.py:16 gives its logits."""
  from torchvision.models.video import mvit_v1_b  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = mvit_v1_b(weights=None).eval()
  torch.save(model.state_dict(), tmp_path / 'mvit_v1_b.pth')
  clip = np.random.default_rng(0).normal(size=(1, 16, 224, 224, 3)).astype(np.float32)
  status, _, stderr = run_tool(
      import_torch, f'--checkpoint={tmp_path / "mvit_v1_b.pth"}',
      '--format=torchvision', f'--config={ROOT}/configs/mvit_b.py:16',
      f'--out={tmp_path / "run"}')
  assert status == 0, stderr
  restored = inference.restore(str(tmp_path / 'run'))
  logits = predict.logits_fn(restored.parts)(restored.params, clip)
  np.testing.assert_allclose(np.asarray(logits), torch_logits(model, clip),
                             atol=1e-4, rtol=0)
