"""stat_jax/compile_cache.py: config.compilation_cache_dir is jax's
persistent cache, a program compiled once is loaded from it (one line saying
so), '~' is the home folder, '' is off, and the environment variable wins.
ci_extra: a restarted tiny run loads its train step from the cache and
starts compiling faster."""

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from conftest import ROOT
from stat_jax import compile_cache

# Compiles one program, forgets it (as a restart would), compiles it again.
SCRIPT = '''
import sys
import jax, jax.numpy as jnp, ml_collections
from stat_jax import compile_cache
config = ml_collections.ConfigDict({'compilation_cache_dir': sys.argv[1]})
print('directory:', compile_cache.enable(config), flush=True)
for start in ('first', 'second'):
  print(start, flush=True)
  jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
  jax.clear_caches()
'''


def without_env_cache() -> dict:
  return {k: v for k, v in os.environ.items()
          if k != compile_cache.ENV_VAR}


def test_the_second_compile_is_a_cache_hit_in_the_home_folder(tmp_path):
  env = dict(without_env_cache(), HOME=str(tmp_path), JAX_PLATFORMS='cpu',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  result = subprocess.run(
      [sys.executable, '-c', SCRIPT, '~/xla-cache'], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300, check=True)
  cache = tmp_path / 'xla-cache'
  assert result.stdout.splitlines() == [f'directory: {cache}', 'first',
                                        'second']
  lines = [line for line in result.stderr.splitlines()
           if line.startswith('Compilation cache')]
  # One line per program loaded (jnp.ones is one too); a program this
  # small may load slower than it compiles: saved < 0.
  hit = re.compile(rf'Compilation cache hit \({re.escape(str(cache))}\): '
                   r'-?[\d.]+ s of compiling saved\.')
  assert lines and all(hit.fullmatch(line) for line in lines), result.stderr
  assert os.listdir(cache)


def cache_config(setting: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'compilation_cache_dir': setting})


def test_an_empty_setting_is_no_cache(monkeypatch):
  monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
  assert compile_cache.directory(cache_config('')) is None
  assert compile_cache.directory(cache_config('gs://b/xla')) == 'gs://b/xla'


def test_the_environment_variable_takes_precedence(monkeypatch):
  monkeypatch.setenv(compile_cache.ENV_VAR, '/from/env')
  assert compile_cache.directory(cache_config('~/from-config')) == '/from/env'
  assert compile_cache.directory(cache_config('')) == '/from/env'


def cached_programs(folder) -> set[str]:
  """The programs in jax's cache folder (not the access-time files jax
  keeps beside them)."""
  return {path.name for path in folder.iterdir()
          if not path.name.endswith('-atime')}


@pytest.mark.ci_extra
def test_a_restarted_run_loads_its_train_step_from_the_cache(motion, tmp_path):
  """Two starts of a tiny run (fresh workdirs, one cache): the second
  says it loaded programs from the cache, and compiles none that the first
  cached (it adds no entry: a key that changed between the starts, e.g. a
  workdir in the program, would add one). Not timed: how much a hit saves
  depends on the load of the machine."""
  outputs, entries = [], []
  for start in ('first', 'second'):
    command = [sys.executable, 'train.py', '--config=configs/tiny.py',
               f'--workdir={tmp_path / start}', '--config.total_steps=1',
               f'--config.compilation_cache_dir={tmp_path / "cache"}',
               f'--config.data.train_spec={motion["train"]}',
               f'--config.data.eval_spec={motion["val"]}',
               f'--config.data.label_map={motion["label_map"]}']
    result = subprocess.run(command, cwd=ROOT, env=without_env_cache(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs.append(result.stdout + result.stderr)
    entries.append(cached_programs(tmp_path / 'cache'))
  assert 'Compilation cache hit' not in outputs[0]
  assert 'Compilation cache hit' in outputs[1]
  assert any(name.startswith('jit_train_step') for name in entries[0])
  assert entries[1] == entries[0]
