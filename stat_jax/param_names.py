"""Parameters by stable dotted names, their layouts, and safetensors I/O.

A parameter's name is its path in the NNX model joined by dots, e.g.
`blocks.3.attn.qkv.kernel` or `embed.convs.0.kernel` (the same names
config.init_from matches). Every tensor keeps Flax's layout; `layouts()`
describes each one for readers in other frameworks (docs/export.md).
"""

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from flax import nnx

from stat_jax.build import abstract_model

_LINEAR = '[in, out]: y = x @ kernel + bias (torch nn.Linear.weight = kernel.T)'
_QKV = ('[C, 3 C]: output columns ordered (q | k | v, head, head_dim) '
        '(torch nn.Linear.weight = kernel.T)')
_CONV = ('[*window, in / groups, out] for N spatial dims, input channels-last '
         '[B, *spatial, C] (torch ConvNd.weight = kernel.permute(N + 1, N, '
         '0, ..., N - 1))')
_NORM = '[C]: y = (x - mean) / sqrt(var + 1e-6) * scale + bias'
_TOKENS = {'cls_token': '[1, 1, 1, C]: the spatial class token of every frame',
           'pos_spatial': '[1, 1, 1 + nh * nw, C]: class token first, then '
                          'the patch grid row-major',
           'pos_temporal': '[1, nt, 1, C]',
           'video_cls': '[1, 1, C]: the video class token'}
# MViT (model.arch = 'mvit'): one class token for the clip.
_MVIT_TOKENS = {'cls_token': '[1, 1, C]: the class token of the clip',
                'pos_spatial': '[1, nh * nw, C]: the patch grid row-major',
                'pos_temporal': '[1, nt, C]',
                'pos_class': '[1, 1, C]: the class token position'}


def name_of(path) -> str:
  """The dotted name of a parameter path: the keys of an NNX flat state, or
  the entries of a jax.tree_util path (DictKey, GetAttrKey, SequenceKey)."""
  return '.'.join(str(_key(entry)) for entry in path)


def _key(entry):
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return getattr(entry, attribute)
  return entry


def named_arrays(params: nnx.State) -> dict[str, np.ndarray]:
  """{dotted name: numpy array} of every parameter."""
  return {name_of(path): np.asarray(variable.get_value())
          for path, variable in nnx.to_flat_state(params)}


def from_named_arrays(arrays: dict, abstract: nnx.State,
                      source: str) -> nnx.State:
  """Parameters shaped like `abstract` (e.g. ModelParts.abstract_params) from
  {dotted name: array}, on the first local device; every name and shape
  must match exactly."""
  flat = nnx.to_flat_state(abstract)
  expected = {name_of(path): variable for path, variable in flat}
  missing = sorted(set(expected) - set(arrays))
  unexpected = sorted(set(arrays) - set(expected))
  if missing or unexpected:
    raise KeyError(f'{source}: missing {missing or "none"}; unexpected '
                   f'{unexpected or "none"}')
  for name, variable in expected.items():
    got, want = tuple(arrays[name].shape), tuple(variable.get_value().shape)
    if got != want:
      raise ValueError(f'{source}: {name} has shape {got}, the model '
                       f'expects {want}')
  device = jax.local_devices()[0]  # where inference.restore puts them
  values = [variable.replace(jax.device_put(
      np.asarray(arrays[name], variable.get_value().dtype), device))
            for name, variable in expected.items()]
  flat = nnx.FlatState.from_sorted_keys_values(flat.paths, values)
  return flat.to_nested_state()


def save_safetensors(params: nnx.State, path: str) -> None:
  with open(path, 'wb') as f:
    f.write(safetensors.numpy.save(named_arrays(params), metadata={
        'names': 'dotted NNX paths', 'layouts': 'params.json'}))


def load_safetensors(path: str, abstract: nnx.State) -> nnx.State:
  return from_named_arrays(safetensors.numpy.load_file(path), abstract, path)


def _layout(module, path, tokens: dict) -> str:
  """How the parameter at `path` (its last key, in `module`) is laid out;
  `tokens`: the layouts of the model's token parameters."""
  owner, leaf = path[-2] if len(path) > 1 else '', path[-1]
  if isinstance(module, nnx.LinearGeneral):  # temporal MHSA projections
    if owner == 'out':
      return '[heads, head_dim, out]' if leaf == 'kernel' else '[out]'
    return '[in, heads, head_dim]' if leaf == 'kernel' else '[heads, head_dim]'
  if isinstance(module, nnx.Conv):
    return _CONV if leaf == 'kernel' else '[out]'
  if isinstance(module, nnx.Linear):
    if leaf == 'bias':
      return '[out]'
    return _QKV if owner == 'qkv' else _LINEAR
  if isinstance(module, nnx.LayerNorm):
    return _NORM
  return tokens.get(leaf, 'see stat_jax/model.py')


def layouts(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{dotted name: layout} of every parameter of the model of `config`."""
  model = abstract_model(config)
  modules = {path: module for path, module in nnx.iter_graph(model)
             if isinstance(module, nnx.Module)}
  tokens = _MVIT_TOKENS if config.model.arch == 'mvit' else _TOKENS
  return {name_of(path): _layout(modules[path[:-1]], path, tokens)
          for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
