"""Every command-line tool parses its own flags (stat_jax/cli.py): tools
imported together do not share absl's global FLAGS, and a second call of a
tool's main starts from its defaults."""

import importlib

from absl import app, flags
import pytest

from stat_jax import cli

TOOLS = ('benchmarks.aot', 'benchmarks.explain_checks',
         'benchmarks.input_pipeline', 'benchmarks.roofline',
         'benchmarks.scaling', 'benchmarks.speed', 'benchmarks.sta_blocks',
         'benchmarks.wide_shards',
         'stat_jax.data.convert', 'stat_jax.data.inspect_shards', 'stat_jax.data.synthetic',
         'stat_jax.deploy.export', 'stat_jax.deploy.predict',
         'stat_jax.explain', 'stat_jax.flops', 'stat_jax.launch')


@pytest.mark.parametrize('name', TOOLS)
def test_a_tool_defines_its_flags_on_its_own_flag_values(name):
  tool = importlib.import_module(name)
  assert isinstance(tool.FLAGS, flags.FlagValues)
  assert tool.FLAGS is not flags.FLAGS
  # (A tool run as `python -m` adds its flags to absl's FLAGS, cli.run:
  # some tests do, so FLAGS may hold them; none is defined there.)
  assert name not in flags.FLAGS.flags_by_module_dict()
  assert callable(tool.main)


def test_config_overrides_apply_to_one_call_only():
  speed = importlib.import_module('benchmarks.speed')
  cli.parse_with_config(speed.FLAGS, ['--config=configs/tiny.py',
                                      '--config.batch_size=3', '--batch=5'])
  assert (speed.FLAGS.config.batch_size, speed.FLAGS.batch) == (3, 5)
  cli.parse_with_config(speed.FLAGS, ['--config=configs/tiny.py',
                                      '--config.batch_size=4'])
  assert (speed.FLAGS.config.batch_size, speed.FLAGS.batch) == (4, 1)
  cli.parse_with_config(speed.FLAGS, ['--config=configs/tiny.py'])
  tiny = importlib.import_module('configs.tiny').get_config(None)
  assert (speed.FLAGS.config.batch_size, speed.FLAGS.batch) == (
      tiny.batch_size, 1)


def test_a_bad_flag_is_a_usage_error():
  scaling = importlib.import_module('benchmarks.scaling')
  with pytest.raises(app.UsageError, match='no_such_flag'):
    scaling.main(['--no_such_flag=1'])
  with pytest.raises(app.UsageError, match='unexpected arguments'):
    scaling.main(['extra'])
  speed = importlib.import_module('benchmarks.speed')
  with pytest.raises(app.UsageError, match="unknown config key 'nokey'"):
    speed.main(['--config=configs/tiny.py', '--config.nokey=1'])
  with pytest.raises(app.UsageError, match='--config.batch_size=many'):
    speed.main(['--config=configs/tiny.py', '--config.batch_size=many'])


def test_flops_tool_counts_the_tiny_model(capsys):
  flops_tool = importlib.import_module('stat_jax.flops')
  assert flops_tool.main(['--config=configs/tiny.py']) == 0
  out = capsys.readouterr().out
  assert 'params' in out and 'GMACs per view' in out
