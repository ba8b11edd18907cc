"""stat_jax/sharding.py: the multi-slice (hybrid) mesh.

Devices are stand-ins carrying what the mesh builder reads (id, platform,
slice or process index), so a layout over several slices is checked here
without a multi-slice job: every fsdp group must lie on one slice (its
all-gathers stay on the slice's own links), "data" must hold each slice's
rows together, and a slice count the devices do not have is one line.
"""

import types

import ml_collections
import numpy as np
import pytest

from stat_jax import sharding
from stat_jax.errors import UserError


def fake_devices(slices: int, per_slice: int, attribute='slice_index'):
  """slices x per_slice CPU-like devices, listed interleaved across slices
  (as a job's device list need not be sorted by slice)."""
  return [types.SimpleNamespace(**{'id': i * slices + s, 'platform': 'cpu',
                                   'device_kind': 'cpu', 'process_index': 0,
                                   attribute: s})
          for i in range(per_slice) for s in range(slices)]


def mesh_config(data=-1, fsdp=1, slices=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, slices=slices))


def slice_grid(grid: np.ndarray) -> np.ndarray:
  return np.vectorize(sharding.slice_of)(grid)


def test_data_spans_the_slices_and_fsdp_stays_inside_one():
  devices = fake_devices(slices=2, per_slice=4)
  grid = sharding.device_grid(mesh_config(fsdp=2, slices=2), devices)
  assert grid.shape == (4, 2)  # [data, fsdp]
  np.testing.assert_array_equal(slice_grid(grid), [[0, 0], [0, 0],
                                                   [1, 1], [1, 1]])
  assert sorted(d.id for d in grid.flat) == list(range(8))


def test_pure_data_parallel_over_four_slices():
  devices = fake_devices(slices=4, per_slice=2)
  grid = sharding.device_grid(mesh_config(slices=4), devices)
  np.testing.assert_array_equal(slice_grid(grid)[:, 0], [0, 0, 1, 1, 2, 2,
                                                         3, 3])


def test_without_a_slice_index_each_process_is_a_slice():
  devices = fake_devices(slices=2, per_slice=2, attribute='process_index')
  grid = sharding.device_grid(mesh_config(fsdp=2, slices=2), devices)
  np.testing.assert_array_equal(
      np.vectorize(lambda d: d.process_index)(grid), [[0, 0], [1, 1]])


def test_more_slices_than_the_devices_are_in_is_one_line():
  devices = fake_devices(slices=1, per_slice=8)
  with pytest.raises(UserError, match=r'config.mesh.slices=2: the 8 devices '
                     r'are in 1 slice\(s\)'):
    sharding.device_grid(mesh_config(slices=2), devices)


def test_slices_that_do_not_divide_the_data_axis_are_one_line():
  devices = fake_devices(slices=4, per_slice=2)
  with pytest.raises(UserError, match=r'config.mesh.slices=4: .*must divide '
                     r'the data axis \(2\)'):
    sharding.device_grid(mesh_config(fsdp=4, slices=4), devices)


def test_one_slice_keeps_the_plain_mesh():
  devices = fake_devices(slices=1, per_slice=8)
  grid = sharding.device_grid(mesh_config(fsdp=4), devices)
  assert grid.shape == (2, 4)
