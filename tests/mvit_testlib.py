"""What the MViT tests share: a tiny MViT config, and torchvision's MViT
class built to the same layout (the reference for the importer)."""

from configs import tiny


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
