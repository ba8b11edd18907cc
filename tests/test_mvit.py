"""MViT-B (model.arch = 'mvit') without torch: its cost against the published
numbers, and the importer's one-line errors on bad files.

The logits against torchvision's own MViT: tests/test_import_torch.py; the
warm start of STAT from MViT-B: tests/test_warm_start.py (both ci_extra).
"""

import os
import re

import pytest
import safetensors.numpy

from configs import mvit_b
from mvit_testlib import run_import, torchvision_tensors
from stat_jax import flops
from stat_jax.checks.config import ConfigError, validate


def test_mvit_b_16x4_cost_is_torchvisions():
  # torchvision's MViT_V1_B_Weights.KINETICS400_V1 metadata: num_params
  # 36610672, 70.599 GFLOPS (multiply-adds) at 16 x 224²; the paper: 70.5 G,
  # 36.6 M.
  macs, params = flops.model_cost(mvit_b.get_config('16'))
  assert params == 36_610_672
  assert macs / 1e9 == pytest.approx(70.599, abs=5e-4)


def _without(tensors, name):
  return {k: v for k, v in tensors.items() if k != name}


BAD_FILES = {
    'missing': (lambda t: _without(t, 'blocks.2.attn.qkv.weight'),
                r'missing 1: blocks\.2\.attn\.qkv\.weight$'),
    'extra': (lambda t: dict(t, **{'blocks.9.norm1.weight': t['norm.weight']}),
              r'unexpected 1: blocks\.9\.norm1\.weight$'),
    'wrong shape': (lambda t: dict(t, **{'blocks.1.mlp.0.weight':
                                         t['blocks.1.mlp.0.weight'].T}),
                    r'wrong shape 1: blocks\.1\.mlp\.0\.weight \(32, 128\) '
                    r'\(expected \(128, 32\)\)$'),
}


@pytest.mark.parametrize('fault', sorted(BAD_FILES))
def test_a_bad_state_dict_gets_one_line_and_writes_nothing(fault, tmp_path):
  change, message = BAD_FILES[fault]
  path = str(tmp_path / 'mvit.safetensors')
  safetensors.numpy.save_file(change(torchvision_tensors()), path)
  status, _, stderr = run_import(path, tmp_path / 'out')
  assert status == 1 and len(stderr.splitlines()) == 1, stderr
  assert f'{path} does not fit the torchvision MViT of the config: ' in stderr
  assert re.search(message, stderr.strip()), stderr
  assert not (tmp_path / 'out').exists()
  assert os.listdir(tmp_path) == ['mvit.safetensors']  # no staging left


def test_a_file_that_is_no_checkpoint_gets_one_line(tmp_path):
  path = tmp_path / 'notes.safetensors'
  path.write_text('not a checkpoint\n')
  status, _, stderr = run_import(path, tmp_path / 'out')
  assert status == 1 and len(stderr.splitlines()) == 1, stderr
  assert f'{path}: not a safetensors file' in stderr
  assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('key,value,message', [
    ('model.arch', 'vit', r"config\.model\.arch = 'vit': must be one of stat, mvit"),
    ('model.stem_layers', 3, r'config\.model\.stem_layers = 3: must be 1 with '
                             r'model\.arch = mvit'),
    ('attention_images', 4, r'config\.attention_images = 4: must be 0 with '
                            r'model\.arch = mvit'),
])
def test_mvit_config_values_are_checked(key, value, message):
  config = mvit_b.get_config('16')
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)


def test_unknown_mvit_clip_length_is_refused():
  with pytest.raises(ValueError, match=r'configs/mvit_b\.py:64: the clip '
                     r'length must be one of \[16, 32\]'):
    mvit_b.get_config('64')
