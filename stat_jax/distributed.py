"""Joining a multi-process JAX job (jax.distributed), for train.py and eval.py.

A process joins one when
  - it is told where: --coordinator_address, --num_processes and --process_id
    (or the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID, which `python -m stat_jax.launch` sets), or
  - jax detects the cluster it runs in: a Cloud TPU VM (pod slice), a SLURM
    step (srun) or Open MPI (mpirun); jax then finds the coordinator, the
    process count and this process's id itself.
Otherwise it runs alone and nothing is initialised. On CPU, processes talk
through gloo collectives (docs/scale-out.md#cpu-processes).

A process that dies is noticed by the others through jax's heartbeats: they
abort ("the JAX distributed service detected fatal errors") within
jax.distributed's heartbeat timeout (100 s by default; the local launcher
stops them at once).
"""

import os

import jax
from absl import flags

from stat_jax.checks.errors import UserError

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 in a multi-process run (env JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None,
    'Number of processes of a multi-process run (env JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None,
    "This process's index, 0 .. num_processes - 1 (env JAX_PROCESS_ID).")

ENV_VARS = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
            'num_processes': 'JAX_NUM_PROCESSES',
            'process_id': 'JAX_PROCESS_ID'}
# jax's cluster detectors that may start a job without being asked (jax has
# no public query for "is this process part of a cluster").
_AUTO_CLUSTERS = ('GceTpuCluster', 'GkeTpuCluster', 'SlurmCluster',
                  'OmpiCluster')


def detected_cluster() -> str | None:
  """The name of the jax cluster detector that finds this environment."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for cluster in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if cluster.__name__ in _AUTO_CLUSTERS and cluster.is_env_present():
      return cluster.__name__
  return None


def _explicit_settings(**given) -> dict:
  """The settings given by flag, else by environment variable."""
  settings = {}
  for name, env_var in ENV_VARS.items():
    value = given[name] if given[name] is not None else os.environ.get(env_var)
    if value is not None:
      settings[name] = value if name == 'coordinator_address' else int(value)
  return settings


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-process job this process was launched into, if any
  (see the module doc); returns whether it did. Call before any other jax
  call that touches devices."""
  settings = _explicit_settings(coordinator_address=coordinator_address,
                                num_processes=num_processes,
                                process_id=process_id)
  cluster = detected_cluster()
  if not settings and cluster is None:
    return False
  missing = [f'--{name} (or {ENV_VARS[name]})' for name in ENV_VARS
             if name not in settings]
  if cluster is None and missing:
    raise UserError(f'a multi-process run needs {", ".join(missing)} as '
                     f'well; got {settings}')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**settings)
  return True


def initialize_from_flags() -> bool:
  """`initialize` with the --coordinator_address / --num_processes /
  --process_id flags of the entry point (parsed by absl)."""
  return initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
