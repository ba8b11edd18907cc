"""Run a multi-process job as local CPU processes (testing scale-out on one
machine):

  python -m stat_jax.launch --num_processes 2 --devices_per_process 2 -- \
      train.py --config=configs/tiny.py --workdir=runs/tiny_2x2

starts `python <command>` N times on localhost, each with its own
`devices_per_process` CPU devices and the environment stat_jax.distributed
reads (JAX_COORDINATOR_ADDRESS on a free port, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Their output is streamed line by line, prefixed "[p0] ",
"[p1] ", ... If one process fails, the others are killed at once (the job
cannot go on without it; SIGTERM would not do, since jax.distributed takes
SIGTERM as a pre-emption notice) and the launcher exits non-zero; it exits
0 when all of them do. Stopping the launcher (Ctrl-C, SIGTERM) kills them too.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app, flags

from stat_jax import cli

_POLL_S = 0.1


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def process_env(process_id: int, num_processes: int, devices: int,
                port: int) -> dict:
  """This machine's environment plus the job settings of one process."""
  xla_flags = [flag for flag in os.environ.get('XLA_FLAGS', '').split()
               if not flag.startswith('--xla_force_host_platform_device_count')]
  return dict(
      os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
      JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id),
      XLA_FLAGS=' '.join(
          xla_flags + [f'--xla_force_host_platform_device_count={devices}']))


def stream(process: subprocess.Popen, prefix: str, lock: threading.Lock):
  """Copies the process's output to ours, each line prefixed."""
  for line in process.stdout:
    with lock:
      try:
        sys.stdout.write(prefix + line.decode(errors='replace'))
        sys.stdout.flush()
      except BrokenPipeError:
        pass  # nobody reads us any more: keep draining, or the process blocks


def describe_exit(returncode: int) -> str:
  if returncode < 0:
    return f'was killed by {signal.Signals(-returncode).name}'
  return f'exited with status {returncode}'


def stop(processes):
  """Kills every process still running and reaps them all, deaf to further
  Ctrl-C / SIGTERM meanwhile."""
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)
  for process in processes:
    if process.poll() is None:
      process.kill()
  for process in processes:
    process.wait()


def wait_all(processes) -> int:
  """0 once every process exited 0, else the status of the first to fail (1
  for a signal) as soon as it does."""
  while True:
    for index, process in enumerate(processes):
      returncode = process.poll()
      if returncode:
        log(f'process {index} {describe_exit(returncode)}; stopping the '
            f'other processes')
        return returncode if returncode > 0 else 1
    if all(process.poll() == 0 for process in processes):
      return 0
    time.sleep(_POLL_S)


def log(message: str):
  print(f'[launch] {message}', file=sys.stderr, flush=True)


def launch(command, num_processes: int, devices_per_process: int) -> int:
  """Runs `python <command>` as num_processes local processes; the exit
  status of the job."""
  port = free_port()
  lock = threading.Lock()
  processes, streams = [], []
  # SIGTERM to the launcher stops the job like Ctrl-C does.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  try:
    for index in range(num_processes):
      env = process_env(index, num_processes, devices_per_process, port)
      process = subprocess.Popen([sys.executable, *command], env=env,
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
      processes.append(process)
      log(f'process {index} started (pid {process.pid})')
      streams.append(threading.Thread(
          target=stream, args=(process, f'[p{index}] ', lock), daemon=True))
      streams[-1].start()
    returncode = wait_all(processes)
  finally:
    stop(processes)
  for thread in streams:
    thread.join()
  return returncode


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_integer('num_processes', None, 'Processes to start.',
                     lower_bound=1, flag_values=FLAGS, required=True)
flags.DEFINE_integer('devices_per_process', 1, 'CPU devices of each process.',
                     lower_bound=1, flag_values=FLAGS)


def run(command: list[str]) -> int:
  """The tool, FLAGS parsed; `command`: what follows '--' (absl stops
  reading flags there)."""
  if not command:
    raise app.UsageError('give the command after "--", e.g. -- train.py '
                         '--config=...')
  try:
    return launch(command, FLAGS.num_processes, FLAGS.devices_per_process)
  except KeyboardInterrupt:  # the processes are killed by now
    log('interrupted')
    return 128 + signal.SIGINT


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
