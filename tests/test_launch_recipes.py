"""The launch recipes of docs/scale-out.md, checked as far as one machine
allows: every config override they pass names a key of the config (a typo
in a recipe would stop a pod job only once it is scheduled), the GKE
JobSet runs as many slices as its command's mesh spans, and the SLURM
script (ci_extra) runs as two local tasks under the variables srun sets,
training the tiny model as one 2-process job (on a two-slice mesh, each
process a slice)."""

import functools
import os
import re
import socket
import subprocess
import sys

import pytest
import yaml

from conftest import FAST_COMPILE, ROOT
from stat_jax import defaults

RECIPES = [os.path.join(ROOT, 'docs', *path) for path in
           [('scale-out.md',), ('launch', 'gke-jobset.yaml'),
            ('launch', 'slurm.sbatch')]]
OVERRIDE = re.compile(r'--config\.([\w.]+)=')


def read(path: str) -> str:
  with open(path) as f:
    return f.read()


def commands(path: str) -> str:
  """The text of a recipe file; of markdown, its code blocks."""
  if not path.endswith('.md'):
    return read(path)
  return '\n'.join(line for line in read(path).splitlines()
                   if line.startswith('    '))


def test_every_override_of_the_recipes_is_a_config_key():
  schema = defaults.base_config(num_frames=16, num_classes=400)
  keys = {key for path in RECIPES
          for key in OVERRIDE.findall(commands(path))}
  assert {'mesh.slices', 'data.train_spec', 'dtype'} <= keys
  for key in keys:
    functools.reduce(lambda section, name: section[name], key.split('.'),
                     schema)  # KeyError naming an unknown key


def test_the_jobset_runs_one_job_per_slice_of_its_mesh():
  jobset = yaml.safe_load(read(RECIPES[1]))
  assert jobset['kind'] == 'JobSet'
  (job,) = jobset['spec']['replicatedJobs']
  pod = job['template']['spec']['template']['spec']
  (container,) = pod['containers']
  command = container['command']
  assert command[:2] == ['python', 'train.py']
  assert f'--config.mesh.slices={job["replicas"]}' in command


def test_the_sbatch_script_is_valid_bash():
  subprocess.run(['bash', '-n', RECIPES[2]], check=True)


# srun as far as the script needs it: SLURM_NTASKS local tasks of the
# command after srun's own options, each with its rank in SLURM_PROCID and
# SLURM_LOCALID; it fails when one of them does.
FAKE_SRUN = f'''#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith('--'):
  args = args[1:]
tasks = [subprocess.Popen(args, env=dict(os.environ, SLURM_PROCID=str(k),
                                         SLURM_LOCALID=str(k)))
         for k in range(int(os.environ['SLURM_NTASKS']))]
sys.exit(max(task.wait() for task in tasks))
'''


def slurm_job_id() -> int:
  """A job id whose coordinator port (jax: 61440 + id mod 4096) is free."""
  for job_id in range(1000, 1000 + 4096):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
      try:
        sock.bind(('127.0.0.1', 61440 + job_id % 4096))
        return job_id
      except OSError:
        continue
  raise RuntimeError('no free port in 61440-65535')


@pytest.mark.ci_extra
def test_the_sbatch_script_trains_as_two_srun_tasks(motion, tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'srun').write_text(FAKE_SRUN)
  (bin_dir / 'srun').chmod(0o755)
  path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable),
                         os.environ['PATH']])  # `python` is this one
  env = dict(os.environ, PATH=path,
             JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_COMPILE,
             SLURM_JOB_ID=str(slurm_job_id()), SLURM_NTASKS='2',
             SLURM_STEP_NODELIST='localhost', SLURM_STEP_NUM_NODES='1')
  workdir = tmp_path / 'run'
  result = subprocess.run(
      ['bash', RECIPES[2], 'configs/tiny.py', str(workdir),
       '--config.total_steps=2', '--config.eval_every=1000',
       '--config.mesh.slices=2',  # each process a slice: the hybrid mesh
       f'--config.data.train_spec={motion["train"]}',
       f'--config.data.eval_spec={motion["val"]}',
       f'--config.data.label_map={motion["label_map"]}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'Training 2 steps of 4 clips on 2 device(s) in 2 process(es)' in (
      result.stdout)
  assert f'Checkpoints: {workdir}/checkpoints (latest step 2)' in result.stdout
