"""What every test shares: fast XLA compilation with one compilation cache
for the whole session, and the small synthetic motion set that the training
tests read.

Most of the suite's time is XLA:CPU compiling the tiny model's programs, and
many tests compile the very same program (the tiny train step, the eval
step), in this process or in the subprocesses of the SIGKILL, pre-emption
and multi-process tests. A persistent cache in a fresh temporary directory
compiles each program once per session; the environment variables reach
the subprocesses too. The cache starts empty every session, so nothing
carries over between runs.

`STAT_JAX_TESTS_AS_RUN=1` runs the tests as users run the code: XLA's own
optimisation flags and no patch of jax internals. CI runs the resume,
SIGKILL, multi-process and export tests so as a second step (.ci/run),
since their bit-exactness claims are about the programs users compile.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

# XLA:CPU's LLVM optimisations and its fusion emitters make the tiny
# programs of the tests run a little faster but compile several times slower
# (the tiny train step: 4x with the emitters); no test is about speed.
AS_RUN = os.environ.get('STAT_JAX_TESTS_AS_RUN') == '1'
FAST_COMPILE = '' if AS_RUN else ('--xla_backend_optimization_level=0 '
                                  '--xla_llvm_disable_expensive_passes=true '
                                  '--xla_cpu_use_fusion_emitters=false')
if FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

# pytest-xdist's workers inherit the variable, so they share the cache that
# the main process made (and removes).
_OWNS_CACHE = 'STAT_JAX_TESTS_XLA_CACHE' not in os.environ
if _OWNS_CACHE:
  os.environ['STAT_JAX_TESTS_XLA_CACHE'] = tempfile.mkdtemp(
      prefix='stat-jax-tests-xla-cache-')
_CACHE_DIR = os.environ['STAT_JAX_TESTS_XLA_CACHE']
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax._src import core as jax_core  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from stat_jax.data import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

# jax may have been imported (by a plugin) before the variables were set.
jax.config.update('jax_compilation_cache_dir', _CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def _plain_tracer_sharding_error(tracer):
  raise AttributeError(f'{type(tracer).__name__} has no sharding')


# flax probes `value.sharding` of every RNG count it stores, ~300 times per
# STAT build, and a tracer answers with an AttributeError whose message jax
# composes by searching the program traced so far: each build under jit or
# eval_shape spends most of its time on messages nobody reads. The tests raise the same error without the
# message; programs and results are unchanged.
if not AS_RUN and isinstance(getattr(jax_core.Tracer, 'sharding', None),
                              property):
  jax_core.Tracer.sharding = property(_plain_tracer_sharding_error)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_cpu_devices(script: str, count: int, xla_flags: str = FAST_COMPILE):
  """Runs the Python `script` from the repository root in a subprocess that
  sees `count` CPU devices (and compiles with `xla_flags`); returns its last
  stdout line, parsed as JSON."""
  env = dict(os.environ, XLA_FLAGS=f'{xla_flags} '
             f'--xla_force_host_platform_device_count={count}')
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                       check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWNS_CACHE:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope='session')
def motion(tmp_path_factory):
  """A tiny synthetic motion set: 48 train, 7 val clips of 16 x 32²
  ({'train', 'val', 'label_map'}: specs and the label map path)."""
  return synthetic.generate(str(tmp_path_factory.mktemp('motion')), 48, 7,
                            num_frames=16, size=32, seed=0)


# The modules that start training subprocesses or train several times run
# first: pytest-xdist (pytest.ini) hands out whole modules in this order, so
# the two workers end close together instead of one waiting on a late start.
_RUN_FIRST = ('test_distributed.py', 'test_resume.py', 'test_training.py',
              'test_faults_training.py', 'test_faults_data.py',
              'test_remat.py', 'test_augment_device.py', 'test_aot.py',
              'test_model.py', 'test_paper_tables.py')


def pytest_collection_modifyitems(items):
  rank = lambda item: (_RUN_FIRST.index(item.path.name)
                       if item.path.name in _RUN_FIRST else len(_RUN_FIRST))
  items.sort(key=rank)  # stable: the order within a module stays


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """A GCS API on 127.0.0.1 (tests/gcs_emulator.py) holding the buckets
  test-bucket and read-only-bucket (writes refused, as by IAM). Its
  variables are in os.environ, so in subprocesses too, until the session
  ends; then the emulator and the proxy are stopped."""
  import gcs_emulator  # pylint: disable=g-import-not-at-top
  emulator = gcs_emulator.Emulator(str(tmp_path_factory.mktemp('gcs')),
                                   read_only=['read-only-bucket'])
  saved = {name: os.environ.get(name) for name in emulator.env}
  os.environ.update(emulator.env)
  try:
    for bucket in ('test-bucket', 'read-only-bucket'):
      emulator.create_bucket(bucket)
    yield emulator
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    emulator.stop()
