"""stat_jax/sharding.py: the multi-slice (hybrid) mesh.

Devices are stand-ins carrying what the mesh builder reads (id, platform,
kind, chip coordinates, slice or process index), so a layout over several
slices is checked here without a multi-slice job: every fsdp group must lie
on one slice (its all-gathers stay on the slice's own links), "data" must
hold each slice's rows together, and a slice count the devices do not have
is one line.
"""

import types

import ml_collections
import numpy as np
import pytest

from stat_jax import sharding
from stat_jax.checks.errors import UserError


def tpu_devices(slices: int, per_slice: int):
  """slices x per_slice TPU v5e chips (a per_slice x 1 row each), listed
  interleaved across slices (a job's device list need not be sorted by
  slice)."""
  return [types.SimpleNamespace(
      id=i * slices + s, platform='tpu', device_kind='TPU v5 lite',
      coords=(i, 0, 0), core_on_chip=0, slice_index=s, process_index=s)
          for i in range(per_slice) for s in range(slices)]


def cpu_devices(processes: int, per_process: int):
  """CPU devices of several processes, all of slice index 0 (as
  jax.distributed gives them)."""
  return [types.SimpleNamespace(id=p * per_process + i, platform='cpu',
                                device_kind='cpu', slice_index=0,
                                process_index=p)
          for p in range(processes) for i in range(per_process)]


def mesh_config(data=-1, fsdp=1, slices=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, slices=slices))


def slice_grid(grid: np.ndarray) -> np.ndarray:
  return np.vectorize(sharding.slice_of)(grid)


def test_data_spans_the_slices_and_fsdp_stays_inside_one():
  devices = tpu_devices(slices=2, per_slice=4)
  grid = sharding.device_grid(mesh_config(fsdp=2, slices=2), devices)
  assert grid.shape == (4, 2)  # [data, fsdp]
  np.testing.assert_array_equal(slice_grid(grid), [[0, 0], [0, 0],
                                                   [1, 1], [1, 1]])
  assert sorted(d.id for d in grid.flat) == list(range(8))


def test_pure_data_parallel_over_four_slices():
  devices = tpu_devices(slices=4, per_slice=2)
  grid = sharding.device_grid(mesh_config(slices=4), devices)
  np.testing.assert_array_equal(slice_grid(grid)[:, 0], [0, 0, 1, 1, 2, 2,
                                                         3, 3])


def test_on_cpus_each_process_is_a_slice():
  devices = cpu_devices(processes=2, per_process=2)
  grid = sharding.device_grid(mesh_config(fsdp=2, slices=2), devices)
  np.testing.assert_array_equal(
      np.vectorize(lambda d: d.process_index)(grid), [[0, 0], [1, 1]])


def test_a_tpu_device_without_a_slice_index_is_in_slice_0():
  device = types.SimpleNamespace(id=0, platform='tpu', process_index=3)
  assert sharding.slice_of(device) == 0
  assert sharding.slice_of(tpu_devices(slices=2, per_slice=1)[1]) == 1


def test_more_slices_than_the_devices_are_in_is_one_line():
  devices = tpu_devices(slices=1, per_slice=8)
  with pytest.raises(UserError, match=r'config.mesh.slices=2: the 8 devices '
                     r'are in 1 slice\(s\)'):
    sharding.device_grid(mesh_config(slices=2), devices)


def test_slices_that_do_not_divide_the_data_axis_are_one_line():
  devices = tpu_devices(slices=4, per_slice=2)
  with pytest.raises(UserError, match=r'config.mesh.slices=4: .*must divide '
                     r'the data axis \(2\)'):
    sharding.device_grid(mesh_config(fsdp=4, slices=4), devices)


def test_one_slice_keeps_the_plain_mesh():
  devices = tpu_devices(slices=1, per_slice=8)
  grid = sharding.device_grid(mesh_config(fsdp=4), devices)
  assert grid.shape == (2, 4)
