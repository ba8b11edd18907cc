"""Warm-start STAT from MViT-B (config.init_from): from a tiny MViT
imported by stat_jax.deploy.import_torch, STAT copies each block's
parameters from the MViT block in its place, adapts the pooling convs and
leaves the rest new; the table says so; training runs from it. And the
imported run as a run: MViT trains and evaluates from it, predict
--clip_npy refuses a clip of the wrong shape in one line.

ci_extra: each test compiles or initialises a model (too slow for the
README's test command).
"""

import os

import jax
import numpy as np
import pytest
import safetensors.numpy

from configs import tiny
from mvit_testlib import run_import, run_tool, torchvision_tensors
from stat_jax import param_names, trainer
from stat_jax.deploy import predict
from stat_jax.checks.errors import UserError
from stat_jax.train_state import ModelParts
from stat_jax.transfer import load_pretrained
from training_testlib import run_config

pytestmark = pytest.mark.ci_extra


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """The tiny MViT imported from random torchvision-named tensors: (run
  directory, the tensors)."""
  folder = tmp_path_factory.mktemp('mvit')
  tensors = torchvision_tensors()
  safetensors.numpy.save_file(tensors, str(folder / 'mvit.safetensors'))
  status, _, stderr = run_import(folder / 'mvit.safetensors', folder / 'run')
  assert status == 0, stderr
  return str(folder / 'run'), tensors


def test_an_existing_out_is_not_replaced(imported):
  status, _, stderr = run_import(
      os.path.join(imported[0], '..', 'mvit.safetensors'), imported[0])
  assert status == 1 and 'exists; give a new directory' in stderr


# The tiny STAT's blocks are the tiny MViT's blocks 1-3 (its 3-layer stem
# replaces MViT's stage 0). What STAT has and MViT does not:
STAT_ONLY = {
    'embed.convs.0.kernel', 'embed.convs.0.bias', 'embed.convs.1.kernel',
    'embed.convs.1.bias', 'embed.convs.2.kernel', 'embed.convs.2.bias',
    'embed.norms.0.scale', 'embed.norms.0.bias', 'embed.norms.1.scale',
    'embed.norms.1.bias', 'cls_token', 'pos_spatial', 'pos_temporal',
    'aggregate.video_cls',
} | {f'aggregate.layers.0.{part}' for part in (
    'norm1.scale', 'norm1.bias', 'attn.query.kernel', 'attn.query.bias',
    'attn.key.kernel', 'attn.key.bias', 'attn.value.kernel',
    'attn.value.bias', 'attn.out.kernel', 'attn.out.bias')}


def test_stat_warm_starts_from_an_imported_mvit(imported, tmp_path):
  workdir, tensors = imported
  target = tiny.get_config()
  fresh = jax.jit(lambda: ModelParts(target).init_params(1))()
  report = tmp_path / 'init_from.txt'
  messages = []
  loaded = load_pretrained(workdir, fresh, log=messages.append,
                           target=target.model, report_path=str(report))
  table = messages[0]
  assert report.read_text() == table + '\n'
  rows = [line.split()[:2] for line in table.splitlines()[1:]]
  ours = param_names.named_arrays(loaded)
  new = {name for status, name in rows if status == 'new'}
  adapted = {name for status, name in rows if status == 'adapted'}
  assert new == STAT_ONLY
  # The per-frame pooling convs: MViT's 3D kernels summed over time.
  assert adapted == {f'blocks.{i}.attn.pool_{x}.conv.kernel'
                     for i in range(3) for x in 'kv'} | {
                         'blocks.1.attn.pool_q.conv.kernel',
                         'blocks.2.attn.pool_q.conv.kernel'}
  copied = set(ours) - new - adapted
  assert table.splitlines()[0].endswith(
      f'(mvit -> stat): copied {len(copied)}, adapted 8, new {len(new)}, '
      'unused 29')
  # Values by hand from the torch tensors: MViT block i + 1 -> STAT block i.
  np.testing.assert_array_equal(ours['blocks.0.attn.qkv.kernel'],
                                tensors['blocks.1.attn.qkv.weight'].T)
  np.testing.assert_array_equal(ours['blocks.2.mlp.fc2.bias'],
                                tensors['blocks.3.mlp.3.bias'])
  np.testing.assert_array_equal(ours['blocks.1.proj.kernel'],
                                tensors['blocks.2.project.weight'].T)
  np.testing.assert_array_equal(ours['head.kernel'], tensors['head.1.weight'].T)
  np.testing.assert_allclose(  # torch [d, 1, t, h, w] -> ours [h, w, 1, d]
      ours['blocks.1.attn.pool_q.conv.kernel'],
      tensors['blocks.2.attn.pool_q.pool.weight'].sum(axis=2).transpose(2, 3, 1, 0),
      rtol=1e-6)
  for name in STAT_ONLY:
    np.testing.assert_array_equal(ours[name],
                                  param_names.named_arrays(fresh)[name])


def test_a_source_of_which_nothing_fits_is_an_error(imported):
  target = tiny.get_config()
  target.model.stage_dims = (8, 24, 48, 96)
  target.model.num_classes = 3
  fresh = jax.jit(lambda: ModelParts(target).init_params(1))()
  with pytest.raises(UserError, match='no parameter of the mvit checkpoint'):
    load_pretrained(imported[0], fresh, log=lambda _: None, target=target.model)


def test_training_runs_from_the_warm_start(imported, motion, tmp_path):
  workdir = str(tmp_path / 'run')
  config = run_config(motion, total_steps=2, init_from=imported[0])
  result = trainer.train_and_evaluate(config, workdir)
  assert sorted(result['losses']) == [1, 2]
  assert all(np.isfinite(loss) for loss in result['losses'].values())
  with open(os.path.join(workdir, 'init_from.txt')) as f:
    assert '(mvit -> stat): copied 60, adapted 8, new 24' in f.readline()


def test_mvit_trains_and_evaluates_from_the_imported_run(imported, motion,
                                                         tmp_path):
  config = run_config(motion, total_steps=2, init_from=imported[0])
  config.model.arch, config.model.stem_layers = 'mvit', 1
  result = trainer.train_and_evaluate(config, str(tmp_path / 'run'))
  assert sorted(result['losses']) == [1, 2]
  assert result['eval']['num_videos'] == 7
  with open(tmp_path / 'run' / 'init_from.txt') as f:
    assert (f'(mvit -> mvit): copied {len(imported[1])}, adapted 0, new 0, '
            'unused 0') in f.readline()


def test_training_in_the_imported_run_says_to_start_from_it(imported, motion):
  config = run_config(motion, total_steps=2)
  config.model.arch, config.model.stem_layers = 'mvit', 1
  with pytest.raises(UserError, match='holds imported weights .* '
                     f'--config.init_from={imported[0]}'):
    trainer.train_and_evaluate(config, imported[0])


def test_predict_clip_npy_refuses_a_clip_of_another_shape(imported, tmp_path):
  clip = tmp_path / 'clip.npy'
  np.save(clip, np.zeros((1, 8, 32, 32, 3), np.float64))
  status, _, stderr = run_tool(predict, f'--workdir={imported[0]}',
                               f'--clip_npy={clip}', '--json')
  assert status == 1 and len(stderr.splitlines()) == 1, stderr
  assert (f'{clip}: holds float64 [1, 8, 32, 32, 3]; the run takes '
          'preprocessed clips float32 [B, 8, 32, 32, 3]') in stderr
