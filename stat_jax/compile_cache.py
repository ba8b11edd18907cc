"""The persistent compilation cache: a restart loads the programs it
compiled before (the train and eval steps) instead of compiling them again.

`config.compilation_cache_dir` (default ~/.cache/stat_jax/xla; a gs://
path works too, shared by every host of a job) is jax's persistent cache;
'' turns it off. Each program loaded from it prints one line to stderr on
process 0, with the compile time it saved. The environment variable
JAX_COMPILATION_CACHE_DIR, when set, takes precedence: jax reads it itself,
and nothing is printed.

CPU processes of one job are left without it: only process 0 writes the
cache, and gloo gives the others 30 s to join each program's first run
while they compile what process 0 loaded (docs/scale-out.md#cpu-processes).
"""

import os
import sys

import jax
import ml_collections

from stat_jax import storage

ENV_VAR = 'JAX_COMPILATION_CACHE_DIR'
_SAVED_EVENT = '/jax/compilation_cache/compile_time_saved_sec'
_listening = []  # the directory named by the listener, once registered


def enable(config: ml_collections.ConfigDict) -> str | None:
  """Points jax's persistent cache at `directory(config)` (call before the
  first compile, after joining a multi-process job); that directory."""
  found = directory(config)
  if found and not os.environ.get(ENV_VAR):
    jax.config.update('jax_compilation_cache_dir', found)
    _report_hits(found)
  return found


def directory(config: ml_collections.ConfigDict) -> str | None:
  """The cache directory of this process (module doc), None for none."""
  if os.environ.get(ENV_VAR):
    return os.environ[ENV_VAR]
  setting = config.get('compilation_cache_dir', '')
  if not setting or (jax.process_count() > 1
                     and jax.default_backend() == 'cpu'):
    return None
  return setting if storage.is_remote(setting) else os.path.expanduser(setting)


def _report_hits(directory: str) -> None:
  if not _listening:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
  _listening[:] = [directory]


def _on_duration(event: str, seconds: float, **kwargs) -> None:
  del kwargs
  if event == _SAVED_EVENT and jax.process_index() == 0:
    print(f'Compilation cache hit ({_listening[0]}): {seconds:.1f} s of '
          'compiling saved.', file=sys.stderr, flush=True)
