"""Device mesh ("data", "fsdp"), parameter sharding rules, global batches.

Batches are split over both mesh axes. A parameter is sharded over "fsdp"
along its largest dimension that the fsdp size divides, if it holds at least
`config.mesh.fsdp_min_size` values; otherwise (and for scalars) replicated.

With `config.mesh.slices` = S > 1 (a multi-slice TPU job) the mesh is
hybrid: "data" spans the S slices over the data-center network (DCN), each
slice holding data / S rows of the mesh whole, so that every fsdp group and
its all-gathers stay on one slice's inter-chip links (ICI) and only the
gradient reduction over "data" crosses DCN. On CPUs and GPUs each process
counts as a slice.
"""

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stat_jax.checks.errors import UserError

BATCH_AXES = ('data', 'fsdp')


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  return Mesh(device_grid(config.mesh, devices), BATCH_AXES)


def device_grid(mesh_config: ml_collections.ConfigDict,
                devices=None) -> np.ndarray:
  """The devices laid out as the [data, fsdp] mesh `mesh_config` asks for."""
  devices = jax.devices() if devices is None else devices
  fsdp, slices = mesh_config.fsdp, mesh_config.get('slices', 1)
  data = mesh_config.data if mesh_config.data != -1 else len(devices) // fsdp
  if data * fsdp != len(devices):
    raise UserError(f'config.mesh data={mesh_config.data} x fsdp={fsdp} '
                     f'does not match the {len(devices)} devices')
  if slices == 1:
    # Splitting a physical axis lets fsdp be any divisor of the device count
    # (fsdp=8 on a 4x4x4 TPU slice), not only a product of its axis sizes.
    return mesh_utils.create_device_mesh((data, fsdp), devices,
                                         allow_split_physical_axes=True)
  return _hybrid_grid(data, fsdp, slices, devices)


def slice_of(device) -> int:
  """The slice a device belongs to: a TPU's slice, else (CPUs, GPUs, whose
  slice index, where they have one, is 0) its process. A TPU device of a
  deviceless single-slice topology (benchmarks/aot.py) has no slice index:
  it is in slice 0."""
  if device.platform == 'tpu':
    return getattr(device, 'slice_index', 0)
  return device.process_index


def _hybrid_grid(data: int, fsdp: int, slices: int, devices) -> np.ndarray:
  """[data, fsdp] devices, "data" split as slices x data/slices."""
  found = len({slice_of(d) for d in devices})
  if data % slices or found != slices:
    raise UserError(f'config.mesh.slices={slices}: the {len(devices)} devices '
                     f'are in {found} slice(s), and slices must divide the '
                     f'data axis ({data})')
  return mesh_utils.create_hybrid_device_mesh(
      (data // slices, fsdp), (slices, 1), devices,
      process_is_granule=devices[0].platform != 'tpu',
      allow_split_physical_axes=True)  # [data, fsdp]


def param_spec(shape, fsdp_size: int, min_size: int) -> P:
  """Shard the largest dimension that fsdp divides, else replicate."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, min_size: int):
  """NamedSharding for every leaf of an (abstract) train state."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp, min_size)),
      abstract_state)


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """Refuses a global batch that the mesh's devices cannot share equally."""
  if batch_size % mesh.size:
    raise UserError(f'config.batch_size={batch_size} is not divisible by the '
                    f'{mesh.size} devices of the mesh: give a multiple of '
                    f'{mesh.size}')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, in the
  order global_batch places its local batch into them (ascending)."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
  return np.unique(np.concatenate([np.arange(batch_size)[index[0]]
                                   for index in indices.values()]))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's numpy batch -> global jax.Arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in local_batch.items()
  }
