"""What the MViT tests share: a tiny MViT config (also as a config file),
a random state dict of it under torchvision's names, the import tool."""

import contextlib
import io
import os

import numpy as np
from flax import nnx

from configs import tiny
from stat_jax import param_names
from stat_jax.deploy import import_torch
from stat_jax.build import abstract_model

CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'mvit_testlib.py')


def tiny_mvit_config():
  """configs/tiny.py as an MViT: 8 frames of 32x32 -> 4 x 8 x 8 tokens, one
  block per stage (grids 8 -> 4 -> 2 -> 1, K/V 2x2 then 1x1)."""
  config = tiny.get_config()
  config.model.arch = 'mvit'
  config.model.stem_layers = 1
  config.model.drop_path = 0.0
  return config


def get_config(arg: str = ''):
  """This file as a config file (--config=tests/mvit_testlib.py)."""
  del arg
  return tiny_mvit_config()


def torchvision_tensors(seed=0) -> dict:
  """A random state dict of the tiny MViT under torchvision's names and
  shapes (stat_jax.deploy.import_torch's table, checked against torchvision
  itself in test_import_torch.py)."""
  model = abstract_model(tiny_mvit_config())
  rng = np.random.default_rng(seed)
  tensors = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = param_names.name_of(path)
    shape = import_torch.source_shape(name, variable.get_value().shape,
                                      'torchvision')
    tensors[import_torch.source_name(name, 'torchvision')] = (
        rng.normal(size=shape).astype(np.float32))
  return tensors


def run_tool(module, *args):
  """(exit status, stdout, stderr) of a tool's main(argv), in process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = module.main(list(args))
  return status, out.getvalue(), err.getvalue()


def run_import(path, out, fmt='torchvision'):
  """(exit status, stdout, stderr) of the import tool on the tiny config."""
  return run_tool(import_torch, f'--checkpoint={path}', f'--format={fmt}',
                  f'--config={CONFIG_FILE}', f'--out={out}')
