"""Scale-out: jax.distributed jobs of local CPU processes (stat_jax.launch).

The runs compared (module fixtures; the slow part):
  one_device      this process (1 device) trains the tiny config, evaluates;
  two_processes   2 processes x 2 devices (mesh data=2, fsdp=2) resume
                  one_device's step 2 with RUN_SCRIPT (1 -> 2 processes),
                  train to the end, evaluate;
  two_to_one      this process resumes the 2-process step 4 on its one
                  device and trains one step (no evaluation, to save time);
  restored        this process restores the 2-process checkpoint on its one
                  device (eval.py's path) and evaluates it;
  killed          2 processes wait in a collective that process 1 never
                  joins; the test SIGKILLs process 1.
Mixup and drop path are off. The global batch is the same array whatever
the process count (stat_jax/data/train_pipeline.py), so the runs differ only by the float
rounding of their meshes' reductions.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import tiny
from conftest import FAST_COMPILE, ROOT
from stat_jax import (checkpoint, distributed, launch, sharding, train_state,
                      trainer)

STEPS = 6
KILL_DEADLINE_S = 30  # a killed process's partner is stopped within this
# PYTHONPATH: RUN_SCRIPT, written to a temporary folder, imports the repo.
ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=FAST_COMPILE,
           PYTHONPATH=ROOT)

RUN_SCRIPT = r'''
"""argv: overrides (JSON), workdir, out prefix. Trains.
Writes <out>.json (losses, eval) and <out>.npz (the parameters) on process 0."""
import json, sys
from stat_jax import distributed
distributed.initialize()
import jax, numpy as np
from jax.experimental import multihost_utils
from configs import tiny
from stat_jax import trainer

overrides, workdir, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
config = tiny.get_config()
for key, value in overrides.items():
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
result = trainer.train_and_evaluate(config, workdir)
report, state = {'losses': result['losses'], 'eval': result['eval']}, result['state']
# Parameters fsdp split across the devices (not all of them replicated).
report['sharded_params'] = sum(
    not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))
params = multihost_utils.process_allgather(state.params, tiled=True)
if jax.process_index() == 0:
  np.savez(out + '.npz', *jax.tree.leaves(params))
  with open(out + '.json', 'w') as f:
    json.dump(report, f)
'''


@pytest.fixture(scope='module')
def overrides(motion) -> dict:
  """Config fields of every run here, over configs/tiny.py."""
  return {'total_steps': STEPS, 'checkpoint_every': 2, 'eval_every': 1000,
          'log_every': 1,
          'model.drop_path': 0.0, 'mixup.mixup_alpha': 0.0,
          'mixup.cutmix_alpha': 0.0, 'data.train_spec': motion['train'],
          'data.eval_spec': motion['val'], 'data.label_map': motion['label_map'],
          'data.eval_batch_size': 4, 'mesh.fsdp': 2, 'mesh.fsdp_min_size': 1}


def tiny_config(overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    section, _, name = key.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


def launcher(num_processes, devices, *command) -> list[str]:
  return [sys.executable, '-m', 'stat_jax.launch',
          f'--num_processes={num_processes}', f'--devices_per_process={devices}',
          '--', *command]


def run_two_processes(tmp_path, overrides, workdir) -> dict:
  """RUN_SCRIPT as 2 local processes of 2 CPU devices each: {'report': its
  JSON, 'params': leaves, 'output': stdout}."""
  script, out = tmp_path / 'run.py', str(tmp_path / 'train')
  script.write_text(RUN_SCRIPT)
  command = launcher(2, 2, str(script), json.dumps(overrides), str(workdir),
                     out)
  result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(out + '.json') as f:
    report = json.load(f)
  with np.load(out + '.npz') as arrays:
    params = [arrays[f'arr_{i}'] for i in range(len(arrays.files))]
  return {'report': report, 'params': params, 'output': result.stdout}


def as_json(report: dict) -> dict:
  """`report` as RUN_SCRIPT's JSON gives it (string step keys, lists)."""
  return json.loads(json.dumps(report))


def collect_output(process) -> list[str]:
  """The lines the process prints, collected by a thread as they come."""
  lines = []
  thread = threading.Thread(target=lambda: lines.extend(process.stdout),
                            daemon=True)
  thread.start()
  return lines


def started_pids(lines) -> dict:
  """{process index: pid} from the launcher's 'process k started' lines."""
  pids = {}
  for line in list(lines):
    if line.startswith('[launch] process') and 'started (pid' in line:
      words = line.split()
      pids[int(words[2])] = int(words[-1].rstrip(')'))
  return pids


WAIT_SCRIPT = r'''
"""Process 0 waits in a collective that process 1 never joins."""
import time
from stat_jax import distributed
distributed.initialize()
import jax
from jax.experimental import multihost_utils
print('waiting', flush=True)
if jax.process_index() == 0:
  multihost_utils.sync_global_devices('process 1 never comes')
else:
  time.sleep(300)
'''


@pytest.fixture(scope='module')
def killed(tmp_path_factory) -> dict:
  """WAIT_SCRIPT as 2 processes; process 1 SIGKILLed once both wait. The
  launcher's status, seconds from the kill to its end, output, pids."""
  script = tmp_path_factory.mktemp('killed') / 'wait.py'
  script.write_text(WAIT_SCRIPT)
  job = subprocess.Popen(launcher(2, 1, str(script)), cwd=ROOT, env=ENV,
                         text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
  lines = collect_output(job)
  try:
    deadline = time.time() + 600  # a bound against a hang (compiles first)
    while sum(line.endswith('] waiting\n') for line in list(lines)) < 2:
      assert time.time() < deadline and job.poll() is None, ''.join(lines)
      time.sleep(0.05)
    pids = started_pids(lines)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    returncode = job.wait(KILL_DEADLINE_S)
    return {'returncode': returncode, 'seconds': time.monotonic() - killed_at,
            'output': ''.join(lines), 'pids': pids}
  finally:
    if job.poll() is None:  # a check above failed; the launcher kills the job
      job.terminate()
      job.wait()


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, overrides):
  workdir = str(tmp_path_factory.mktemp('one_device'))
  result = trainer.train_and_evaluate(
      tiny_config(dict(overrides, **{'mesh.fsdp': 1})), workdir)
  return {'report': as_json({'losses': result['losses'],
                             'eval': result['eval']}),
          'params': jax.tree.leaves(jax.device_get(result['state'].params)),
          'workdir': workdir}


def step_dir(workdir, step) -> str:
  return os.path.join(checkpoint.checkpoint_dir(workdir), str(step))


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory, overrides, one_device):
  """one_device's step 2 resumed and trained to the end by 2 processes."""
  tmp = tmp_path_factory.mktemp('two_processes')
  workdir = str(tmp / 'run')
  shutil.copytree(step_dir(one_device['workdir'], 2), step_dir(workdir, 2))
  return dict(run_two_processes(tmp, overrides, workdir), workdir=workdir)


TWO_TO_ONE_FROM, TWO_TO_ONE_STOP = 4, 5


@pytest.fixture(scope='module')
def two_to_one(tmp_path_factory, overrides, two_processes):
  """The 2-process checkpoint of step 4 resumed on this process's device."""
  workdir = str(tmp_path_factory.mktemp('two_to_one'))
  shutil.copytree(step_dir(two_processes['workdir'], TWO_TO_ONE_FROM),
                  step_dir(workdir, TWO_TO_ONE_FROM))
  result = trainer.train_and_evaluate(
      tiny_config(dict(overrides, **{'mesh.fsdp': 1})), workdir,
      stop_after=TWO_TO_ONE_STOP)
  return {'losses': as_json(result['losses']), 'workdir': workdir}


@pytest.fixture(scope='module')
def restored(overrides, two_processes):
  """eval.py's path in this process, on one device."""
  config = tiny_config(dict(overrides, **{'mesh.fsdp': 1}))
  report = trainer.evaluate_checkpoint(config, two_processes['workdir'])
  mesh = sharding.make_mesh(config)
  _, _, abstract, shardings = train_state.abstract_train_state(config, mesh)
  ckpt = checkpoint.Checkpointer(
      checkpoint.checkpoint_dir(two_processes['workdir']), 1, read_only=True)
  state = ckpt.restore_state(ckpt.latest_step(),
                             train_state.with_shardings(abstract, shardings))
  return {'report': as_json({'eval': report}),
          'params': jax.tree.leaves(jax.device_get(state.params))}


def read_loss_log(workdir) -> dict:
  """{step (str): loss} from train_log.jsonl; a resumed step: the latest."""
  losses = {}
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    for line in f:
      entry = json.loads(line)
      losses[str(entry['step'])] = entry['loss']
  return losses


def in_step_order(losses: dict) -> np.ndarray:
  assert sorted(map(int, losses)) == list(range(1, STEPS + 1))
  return np.array([losses[str(step)] for step in range(1, STEPS + 1)])


# ---------------------------------------------------------------- training ---

def test_two_processes_train_like_one_device(one_device, two_processes):
  """Steps 3 to the end on 2 processes x 2 devices, from one_device's step 2."""
  assert two_processes['report']['sharded_params'] > 0  # fsdp=2 split some
  one = in_step_order(one_device['report']['losses'])
  assert np.isfinite(one).all() and len(set(one.tolist())) == STEPS
  two = read_loss_log(two_processes['workdir'])
  assert sorted(map(int, two)) == list(range(3, STEPS + 1))
  difference = max(abs(loss - one[int(step) - 1]) for step, loss in two.items())
  print(f'max |loss(2 processes) - loss(1 device)| = {difference:.2e}')
  assert difference < 1e-5  # the meshes round differently
  for a, b in zip(one_device['params'], two_processes['params']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_killing_a_process_stops_the_job(killed):
  print(f'the job stopped {killed["seconds"]:.2f}s after process 1 was killed')
  assert killed['returncode'] != 0
  assert ('[launch] process 1 was killed by SIGKILL; stopping the other '
          'processes') in killed['output']
  with pytest.raises(ProcessLookupError):  # process 0 is gone too
    os.kill(killed['pids'][0], 0)


def saved_data_states(workdir, step) -> list[dict]:
  """The data states of the processes that saved checkpoint `step` (the
  JSON item 'data', stat_jax/checkpoint.py)."""
  with open(os.path.join(step_dir(workdir, step), 'data', 'metadata')) as f:
    return json.load(f)['processes']


def test_data_positions_agree_on_every_process_count(
    one_device, two_processes, two_to_one):
  # Steps of 4 clips, one record each, in the 48-record epoch 0. The
  # 2-process job read from the 1-process position, and the reverse.
  for workdir, step, processes in ((one_device['workdir'], STEPS, 1),
                                   (two_processes['workdir'], STEPS, 2),
                                   (two_to_one['workdir'], TWO_TO_ONE_STOP, 1)):
    states = saved_data_states(workdir, step)
    assert len(states) == processes
    expected = {'epoch': 0, 'position': step * 4, 'num_skipped': 0}
    for state in states:
      assert {key: state[key] for key in expected} == expected


def test_a_one_process_checkpoint_resumes_on_two_processes(two_processes):
  assert '[p0] Resuming from step 2' in two_processes['output']
  resumed = two_processes['report']['losses']  # what train_and_evaluate ran
  assert sorted(map(int, resumed)) == list(range(3, STEPS + 1))


def test_a_two_process_checkpoint_resumes_on_one_process(
    one_device, two_to_one):
  resumed = two_to_one['losses']
  assert sorted(map(int, resumed)) == list(range(TWO_TO_ONE_FROM + 1,
                                                 TWO_TO_ONE_STOP + 1))
  reference = one_device['report']['losses']
  for step, loss in resumed.items():  # the meshes round differently
    assert loss == pytest.approx(reference[step], abs=1e-5)


def test_launcher_stops_the_others_when_one_process_fails():
  code = ('import os, sys, time; rank = os.environ["JAX_PROCESS_ID"]; '
          'print("hello from", rank, "of", os.environ["JAX_NUM_PROCESSES"]); '
          'sys.exit(3) if rank == "1" else time.sleep(120)')
  start = time.monotonic()
  result = subprocess.run(launcher(2, 1, '-c', code), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert time.monotonic() - start < 30
  assert result.returncode == 3
  assert '[p0] hello from 0 of 2' in result.stdout
  assert '[p1] hello from 1 of 2' in result.stdout
  assert 'process 1 exited with status 3; stopping' in result.stderr


# -------------------------------------------------------------- evaluation ---

def test_multi_process_eval_counts_every_video_once(
    one_device, two_processes, restored):
  multi = two_processes['report']['eval']
  single = restored['report']['eval']  # the same parameters, 1 process
  assert multi['num_videos'] == single['num_videos'] == 7
  assert multi['num_views'] == single['num_views'] == 7 * 2
  assert np.sum(multi['confusion_matrix']) == 7  # counted once over processes
  assert multi['skipped'] == 0
  assert multi['per_class_videos'] == single['per_class_videos']
  assert one_device['report']['eval']['per_class_videos'] == \
      multi['per_class_videos']
  views = lambda result: {p['video_id']: p['views']
                          for p in result['predictions']}
  assert views(multi) == views(single) == {v: 2 for v in range(7)}
  assert (multi['top1'], multi['top5']) == (single['top1'], single['top5'])
  for a, b in zip(multi['predictions'], single['predictions']):
    np.testing.assert_allclose(a['top5_probs'], b['top5_probs'], atol=1e-6)


# ------------------------------------------------------------- checkpoints ---

def test_two_process_checkpoint_restores_on_one_device(
    two_processes, restored):
  state_dir = os.path.join(two_processes['workdir'], 'checkpoints',
                           str(STEPS), 'state')
  written = sorted(name for name in os.listdir(state_dir)
                   if name.startswith('ocdbt.process_'))
  assert written == ['ocdbt.process_0', 'ocdbt.process_1']  # both wrote
  assert len(restored['params']) == len(two_processes['params'])
  for a, b in zip(two_processes['params'], restored['params']):
    np.testing.assert_array_equal(a, b)


AGREE_SCRIPT = r'''
"""argv: checkpoint folder. Saves steps 1 and 2 of a replicated array; then
process 1 alone finds step 2 corrupt, and all restore the newest whole
step. Prints {'step', 'w', 'on_disk'}."""
import json, os, sys
from stat_jax import distributed
distributed.initialize()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from configs import tiny
from stat_jax import checkpoint
folder = sys.argv[1]
replicated = NamedSharding(Mesh(np.array(jax.devices()), ('x',)), P())
ckpt = checkpoint.Checkpointer(folder, 3)
for step in (1, 2):
  w = jax.make_array_from_process_local_data(replicated, np.full(4, step, np.float32))
  ckpt.save(step, {'w': w}, {'position': step}, tiny.get_config())
ckpt.wait()
read = ckpt._reader.restore
def unreadable_on_process_1(step, **kwargs):  # inside orbax's restore
  if step == 2 and jax.process_index() == 1:
    raise OSError('process 1 cannot read its shard')
  return read(step, **kwargs)
ckpt._reader.restore = unreadable_on_process_1
abstract = {'w': jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated)}
step, state = ckpt.newest_whole(
    'latest', lambda s: ckpt.restore_state(s, abstract), move_aside=True)
print(json.dumps({'step': step, 'w': np.asarray(state['w'].addressable_data(0)).tolist(),
                  'on_disk': sorted(os.listdir(folder))}), flush=True)
ckpt.close()
'''


@pytest.mark.ci_extra  # two process start-ups: past the README command's budget
def test_processes_agree_on_the_checkpoint_to_restore(tmp_path):
  """Only process 1 finds the latest step corrupt: both restore the step
  before it, and it is moved aside once."""
  script = tmp_path / 'agree.py'
  script.write_text(AGREE_SCRIPT)
  result = subprocess.run(launcher(2, 1, str(script), str(tmp_path / 'ckpt')),
                          cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=240)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  reports = {line[:4]: json.loads(line[5:])
             for line in result.stdout.splitlines() if line[5:].startswith('{')}
  assert set(reports) == {'[p0]', '[p1]'}, result.stdout
  for report in reports.values():
    assert report == {'step': 1, 'w': [1.0] * 4,
                      'on_disk': ['1', '2.corrupt']}
  output = result.stdout  # the launcher's: both processes' stdout and stderr
  assert ('[p0] warning: checkpoint step 2 ' in output
          and 'cannot be read by process(es) 1; trying the checkpoint before'
          in output), output
  assert '[p1] warning: process 1: checkpoint step 2 ' in output
  assert 'cannot be read: process 1 cannot read its shard' in output


def test_data_states_of_all_processes_are_kept_in_order():
  # One process here: the gather is the identity, as a list.
  state = {'epoch': 1, 'position': 5, 'process_index': 0}
  assert checkpoint.gather_int_dicts(state) == [state]


# ------------------------------------------------------------- initialize ---

def test_a_single_process_run_initializes_nothing(monkeypatch):
  for env_var in distributed.ENV_VARS.values():
    monkeypatch.delenv(env_var, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is False
  assert jax.process_count() == 1


def test_partial_settings_are_refused_naming_what_is_missing(monkeypatch):
  for env_var in distributed.ENV_VARS.values():
    monkeypatch.delenv(env_var, raising=False)
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  with pytest.raises(ValueError, match=r'needs --coordinator_address \(or '
                     r'JAX_COORDINATOR_ADDRESS\), --process_id'):
    distributed.initialize()


def test_jax_detects_a_slurm_step(monkeypatch):
  for name, value in {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node1',
                      'SLURM_NTASKS': '2', 'SLURM_PROCID': '0',
                      'SLURM_LOCALID': '0'}.items():
    monkeypatch.setenv(name, value)
  assert distributed.detected_cluster() == 'SlurmCluster'


def test_launcher_gives_each_process_its_settings():
  env = launch.process_env(1, 2, 4, 1234)
  assert env['JAX_COORDINATOR_ADDRESS'] == '127.0.0.1:1234'
  assert (env['JAX_NUM_PROCESSES'], env['JAX_PROCESS_ID']) == ('2', '1')
  assert '--xla_force_host_platform_device_count=4' in env['XLA_FLAGS']
