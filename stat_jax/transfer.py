"""`config.init_from`: start from another run's parameters (e.g. K400 -> SSv2),
or warm-start STAT from MViT-B (a run of configs/mvit_b.py, or public
weights brought in by stat_jax.deploy.import_torch).

Between runs of one architecture, parameters are matched by their path in
the model; one whose shape differs (the classifier when the class count
changes) keeps its fresh initialisation. From MViT-B to STAT, each
parameter is matched by its role:

- STAT's blocks are MViT-B's last ones (STAT's stem replaces the stages
  before them, stat_jax/arch.py): block i takes MViT block i + (MViT
  blocks - STAT blocks). Its norms, qkv, proj, MLP, widening projection and
  pooling norms are copied; its per-frame 2D pooling convs are adapted from
  MViT's 3D ones by summing the temporal taps (the same pooling on a clip
  that does not move).
- The final norm and the head are copied where their shapes match.
- With the 1-layer stem (MViT's patch embedding) the stem conv is copied,
  the class token reshaped, and the position embeddings adapted: MViT's
  class position joins the spatial grid as STAT's class-token entry, and a
  grid or frame count that differs is resized linearly.
- The rest (the 3- or 5-layer stem and the embeddings at its width, the
  temporal aggregation block) is new.

The table of what was copied, adapted and left new goes to `log` and to
`report_path`; a source of which nothing fits is an error.
"""

import json
import re

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from flax import nnx

from stat_jax import arch, param_names, storage
from stat_jax.checks.errors import UserError


def _flatten(tree) -> dict:
  """{dotted name: array}; the NNX variables of `params` and the nested
  dicts a checkpoint restores to get the same names."""
  return {param_names.name_of(path).removesuffix('.value'): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _latest_state_dir(source: str) -> str:
  """A run workdir, its checkpoints/ dir, or one step dir -> the state item."""
  for candidate in (source, storage.join(source, 'checkpoints')):
    if tf.io.gfile.isdir(storage.join(candidate, 'state')):
      return storage.join(candidate, 'state')
    # GCS lists folders with a trailing '/'
    names = (tf.io.gfile.listdir(candidate)
             if tf.io.gfile.isdir(candidate) else [])
    steps = [int(name.rstrip('/')) for name in names
             if name.rstrip('/').isdigit()]
    if steps:
      return storage.join(candidate, str(max(steps)), 'state')
  raise FileNotFoundError(f'config.init_from={source!r}: no checkpoint found '
                          '(expected a workdir, its checkpoints/ or a step dir)')


def _saved_model_config(state_dir: str) -> ml_collections.ConfigDict | None:
  """The model section of the config saved beside the state item."""
  path = storage.join(storage.parent(state_dir), 'config', 'metadata')
  if not tf.io.gfile.exists(path):
    return None
  return ml_collections.ConfigDict(json.loads(storage.read_text(path))['model'])


def _resized(array: np.ndarray, shape: tuple) -> np.ndarray:
  return np.asarray(jax.image.resize(array, shape, 'linear'), np.float32)


def _spatial_grid(pos: np.ndarray) -> np.ndarray:
  """[1, h*w, C] (a square grid) -> [h, w, C]."""
  side = int(round(np.sqrt(pos.shape[1])))
  return pos.reshape(side, side, pos.shape[-1])


class _MViTToSTAT:
  """The role-by-role mapping (module doc): adapt(name, shape) -> (value,
  source names, note) or None."""

  def __init__(self, saved: dict, source: ml_collections.ConfigDict,
               target: ml_collections.ConfigDict):
    self.saved = saved
    self.offset = len(arch.block_specs(source)) - len(arch.block_specs(target))

  def source_name(self, name: str) -> str:
    match = re.match(r'blocks\.(\d+)\.(.*)', name)
    if match:
      return f'blocks.{int(match[1]) + self.offset}.{match[2]}'
    return name

  def __call__(self, name: str, shape: tuple):
    saved = self.saved
    theirs = self.source_name(name)
    same = _same_path(saved)(theirs, shape)
    if same:
      return same
    if re.fullmatch(r'blocks\.\d+\.attn\.pool_[qkv]\.conv\.kernel', name):
      kernel = saved.get(theirs)
      if kernel is not None and kernel.sum(axis=0).shape == shape:
        return kernel.sum(axis=0), [theirs], 'temporal taps summed'
    width = shape[-1]
    fits = lambda key: key in saved and saved[key].shape[-1] == width
    if name == 'cls_token' and fits('cls_token'):
      return saved['cls_token'].reshape(shape), ['cls_token'], 'reshaped'
    if name == 'pos_spatial' and fits('pos_spatial') and fits('pos_class'):
      side = int(round(np.sqrt(shape[2] - 1)))
      source_grid = _spatial_grid(saved['pos_spatial'])
      grid = _resized(source_grid, (side, side, width))
      value = np.concatenate([saved['pos_class'].reshape(1, width),
                              grid.reshape(-1, width)]).reshape(shape)
      return value, ['pos_class', 'pos_spatial'], (
          f'class position first; grid {source_grid.shape[:2]} -> {(side, side)}')
    if name == 'pos_temporal' and fits('pos_temporal'):
      frames = _resized(saved['pos_temporal'][0], (shape[1], width))
      return frames.reshape(shape), ['pos_temporal'], (
          f'{saved["pos_temporal"].shape[1]} -> {shape[1]} frames')
    return None


def _same_path(saved: dict):
  def adapt(name, shape):
    if name in saved and np.shape(saved[name]) == shape:
      return saved[name], [name], ''
    return None
  return adapt


def transfer_table(saved: dict, ours: dict, adapt) -> tuple[dict, list]:
  """({our name: new value} of what `adapt` fills, rows (status, name,
  source names, note)) for our parameters `ours` {name: shape}."""
  values, rows, used = {}, [], set()
  for name, shape in ours.items():
    found = adapt(name, shape)
    if found is None:
      rows.append(('new', name, '', ''))
      continue
    value, sources, note = found
    values[name] = value
    used.update(sources)
    rows.append(('adapted' if note else 'copied', name,
                 ', '.join(sources) if sources != [name] else '', note))
  rows += [('unused', name, '', '') for name in sorted(set(saved) - used)]
  return values, rows


def format_table(path: str, arches: str, rows: list) -> str:
  counts = {status: sum(row[0] == status for row in rows)
            for status in ('copied', 'adapted', 'new', 'unused')}
  lines = [f'init_from {path} ({arches}): ' + ', '.join(
      f'{status} {count}' for status, count in counts.items())]
  width = max(len(row[1]) for row in rows)
  for status, name, source, note in rows:
    origin = f' <- {source}' if source else ''
    lines.append(f'  {status:8s} {name:{width}s}{origin}'
                 f'{f" ({note})" if note else ""}'.rstrip())
  return '\n'.join(lines)


def load_pretrained(source: str, params: nnx.State, log=print, *,
                    target: ml_collections.ConfigDict | None = None,
                    report_path: str | None = None) -> nnx.State:
  """`params` with what the run at `source` gives them (module doc).
  `target`: our model config (needed to map MViT-B's blocks onto STAT's)."""
  path = _latest_state_dir(source)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.restore(path)
  saved = {name: np.asarray(value)
           for name, value in _flatten(saved['params']).items()}
  ours = _flatten(params)
  source_model = _saved_model_config(path)
  source_arch = source_model.get('arch', 'stat') if source_model else 'stat'
  target_arch = target.arch if target is not None else source_arch
  if source_arch == 'mvit' and target_arch == 'stat':
    adapt = _MViTToSTAT(saved, source_model, target)
  else:
    adapt = _same_path(saved)
  values, rows = transfer_table(
      saved, {name: tuple(leaf.shape) for name, leaf in ours.items()}, adapt)
  table = format_table(path, f'{source_arch} -> {target_arch}', rows)
  log(table)
  if report_path and jax.process_index() == 0:
    storage.write_text(report_path, table + '\n')
  if not values:
    raise UserError(f'config.init_from={source!r}: no parameter of the '
                    f'{source_arch} checkpoint at {path} fits this '
                    f'{target_arch} model (table above)')
  new_leaves = [jax.device_put(np.asarray(values[name], leaf.dtype), leaf.sharding)
                if name in values else leaf for name, leaf in ours.items()]
  return jax.tree.unflatten(jax.tree.structure(params), new_leaves)
