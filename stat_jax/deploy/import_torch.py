"""Import public MViT-B weights from PyTorch as a stat-jax run.

  python -m stat_jax.deploy.import_torch --checkpoint mvit_v1_b-dbeb1030.pth \
      --format torchvision --config configs/mvit_b.py:16 --out runs/mvit_b_16
  python -m stat_jax.deploy.import_torch --checkpoint K400_MVIT_B_16x4_CONV.pyth \
      --format pyslowfast --config configs/mvit_b.py:16 --out runs/mvit_b_16

--checkpoint: torchvision's `mvit_v1_b` state dict (.pth), a PySlowFast
checkpoint (.pyth, its `model_state`), or either state dict as a
.safetensors file. PyTorch files are read with
`torch.load(weights_only=True)`, whose unpickler builds tensors and plain
containers only and refuses any other object: no code in the file runs.
torch is needed for those alone (any recent build, CPU will do; the
package's `torch` extra pins the pair the tests use); safetensors files need no torch.

Every parameter of the model of --config gets one tensor of the file, by
the renames of --format and in Flax's layout (stat_jax/param_names.py);
every tensor must be used and every shape must match, else one error lists
what is missing, unexpected or mis-shaped, and nothing is written. --out
becomes a run directory holding step 0 (the parameters, a fresh optimizer
state, the config), which eval.py, stat_jax.deploy.predict and
stat_jax.deploy.export read with --workdir, and which training starts from
with --config.init_from (a new run: fine-tuning, or a warm start of STAT).
"""

import os
import pickle
import re
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import safetensors.numpy
from absl import flags
from flax import nnx
from ml_collections import config_flags

from stat_jax import checkpoint, cli, param_names, sharding
from stat_jax.checks.config import validate
from stat_jax.checks.errors import UserError, report_user_errors
from stat_jax.train_state import TrainState, abstract_train_state

FORMATS = ('torchvision', 'pyslowfast')

# Our dotted names -> each format's, applied in order; then the leaf
# (kernel, scale -> weight).
_RENAMES = {
    'torchvision': (
        (r'^embed\.convs\.0\.', 'conv_proj.'),
        (r'^cls_token$', 'pos_encoding.class_token'),
        (r'^pos_(spatial|temporal|class)$', r'pos_encoding.\1_pos'),
        (r'\.attn\.proj\.', '.attn.project.0.'),
        (r'\.attn\.(pool_[qkv])\.conv\.', r'.attn.\1.pool.'),
        (r'\.attn\.(pool_[qkv])\.norm\.', r'.attn.\1.norm_act.0.'),
        (r'\.mlp\.fc1\.', '.mlp.0.'),
        (r'\.mlp\.fc2\.', '.mlp.3.'),
        (r'^(blocks\.\d+)\.proj\.', r'\1.project.'),
        (r'^head\.', 'head.1.'),
    ),
    'pyslowfast': (
        (r'^embed\.convs\.0\.', 'patch_embed.proj.'),
        (r'^pos_(spatial|temporal|class)$', r'pos_embed_\1'),
        (r'\.attn\.pool_([qkv])\.conv\.', r'.attn.pool_\1.'),
        (r'\.attn\.pool_([qkv])\.norm\.', r'.attn.norm_\1.'),
        (r'^head\.', 'head.projection.'),
    ),
}
_LEAVES = ((r'\.(kernel|scale)$', '.weight'),)
# torchvision keeps the class token and position embeddings without their
# leading axes of size 1: how many of ours it drops.
_TOKEN_AXES_DROPPED = {
    'torchvision': {'cls_token': 2, 'pos_class': 2, 'pos_spatial': 1,
                    'pos_temporal': 1},
    'pyslowfast': {},
}


def source_name(name: str, fmt: str) -> str:
  """The tensor name in a `fmt` state dict of our parameter `name`."""
  for pattern, replacement in _RENAMES[fmt] + _LEAVES:
    name = re.sub(pattern, replacement, name)
  return name


def source_shape(name: str, shape: tuple, fmt: str) -> tuple:
  """The shape the `fmt` tensor of our parameter `name` (of `shape`) has."""
  if name.endswith('kernel') and len(shape) == 2:  # torch Linear: [out, in]
    return shape[::-1]
  if name.endswith('kernel'):  # torch ConvNd: [out, in / groups, *window]
    return (shape[-1], shape[-2], *shape[:-2])
  return shape[_TOKEN_AXES_DROPPED[fmt].get(name, 0):]


def to_ours(name: str, tensor: np.ndarray, shape: tuple) -> np.ndarray:
  """A tensor in torch's layout (source_shape) -> ours, float32."""
  if name.endswith('kernel') and tensor.ndim == 2:
    tensor = tensor.T
  elif name.endswith('kernel'):
    tensor = np.moveaxis(tensor, (0, 1), (-1, -2))
  return np.ascontiguousarray(tensor.reshape(shape), np.float32)


def convert(tensors: dict, expected: dict, fmt: str, source: str) -> dict:
  """{our name: array} from a `fmt` state dict; `expected`: {our name:
  shape}. UserError listing every missing, unexpected and mis-shaped
  tensor."""
  wanted = {source_name(name, fmt): name for name in expected}
  missing = sorted(set(wanted) - set(tensors))
  unexpected = sorted(set(tensors) - set(wanted))
  misshaped = []
  for theirs, ours in wanted.items():
    want = source_shape(ours, expected[ours], fmt)
    if theirs in tensors and tuple(tensors[theirs].shape) != want:
      misshaped.append(f'{theirs} {tuple(tensors[theirs].shape)} (expected '
                       f'{want})')
  if missing or unexpected or misshaped:
    faults = [f'{label} {len(items)}: {", ".join(items)}' for label, items in
              (('missing', missing), ('unexpected', unexpected),
               ('wrong shape', misshaped)) if items]
    raise UserError(f'{source} does not fit the {fmt} MViT of the config: '
                    + '; '.join(faults))
  return {ours: to_ours(ours, tensors[theirs], expected[ours])
          for theirs, ours in wanted.items()}


def _unpickling_error(path: str, error: pickle.UnpicklingError) -> UserError:
  """torch's weights-only refusal as one line: an object it would not build
  (a global such as os.system), or bytes that are no pickle it reads."""
  lines = [line.strip() for line in str(error).splitlines()]
  refused = [line for line in lines if line.startswith('Trying to load')]
  if refused:
    return UserError(f'{path}: refused, it holds more than tensors '
                     f'(torch.load with weights_only=True: {refused[0]}); '
                     'nothing in it was run')
  unreadable = [line for line in lines if line.startswith('Unsupported')]
  return UserError(f'{path}: not a PyTorch checkpoint (torch.load with '
                   f'weights_only=True: {(unreadable or lines)[0]})')


def _read_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise UserError(f'{path}: reading a PyTorch file needs torch (pip install '
                    'torch; a CPU build will do); a .safetensors file needs '
                    'none') from error
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as error:
    raise _unpickling_error(path, error) from error
  except Exception as error:  # torch raises many types for a bad file
    reason = (str(error).strip().splitlines() or [''])[0][:200]
    raise UserError(f'{path}: not a PyTorch checkpoint (torch.load: '
                    f'{type(error).__name__}: {reason})') from error
  if isinstance(loaded, dict) and isinstance(loaded.get('model_state'), dict):
    loaded = loaded['model_state']  # PySlowFast: {'model_state', 'epoch', ...}
  if not isinstance(loaded, dict):
    raise UserError(f'{path}: holds a {type(loaded).__name__}, not a state '
                    'dict of tensors')
  others = sorted(k for k, v in loaded.items() if not isinstance(v, torch.Tensor))
  if others:
    raise UserError(f'{path}: not a state dict of tensors: {", ".join(others)}')
  return {name: tensor.detach().float().numpy()
          for name, tensor in loaded.items()}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file or a PyTorch checkpoint; the
  'module.' prefix of a model saved from DistributedDataParallel dropped."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if path.endswith('.safetensors'):
    try:
      tensors = safetensors.numpy.load_file(path)
    except Exception as error:  # safetensors raises its own types
      raise UserError(f'{path}: not a safetensors file: {error}') from error
  else:
    tensors = _read_torch(path)
  return {name.removeprefix('module.'): tensor
          for name, tensor in tensors.items()}


def import_checkpoint(path: str, fmt: str, config, out: str) -> str:
  """Write the run directory `out` from the checkpoint at `path`; nothing
  is written unless every tensor fits. Returns the checkpoint step dir."""
  validate(config)
  if config.model.arch != 'mvit':
    raise UserError(f'model.arch = {config.model.arch!r}: the weights are '
                    "MViT-B's; give an MViT config (configs/mvit_b.py)")
  if os.path.exists(out):
    raise UserError(f'--out {out} exists; give a new directory')
  tensors = read_state_dict(path)
  mesh = sharding.make_mesh(config, jax.local_devices()[:1])
  parts, tx, _, _ = abstract_train_state(config, mesh)
  expected = {param_names.name_of(name): tuple(variable.get_value().shape)
              for name, variable in nnx.to_flat_state(parts.abstract_params)}
  arrays = convert(tensors, expected, fmt, path)
  params = param_names.from_named_arrays(arrays, parts.abstract_params, path)
  state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                     opt_state=tx.init(params))
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}-', dir=parent)
  try:
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(staging), 1)
    # No train data was read: training goes on from here as a new run
    # (--config.init_from), not by resuming this directory.
    ckpt.save(0, state, checkpoint.IMPORTED_DATA_STATE, config)
    ckpt.wait()
    ckpt.close()
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return os.path.join(checkpoint.checkpoint_dir(out), '0')


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('checkpoint', None, 'PyTorch (.pth, .pyth) or .safetensors '
                    'file of MViT-B weights.', flag_values=FLAGS)
flags.DEFINE_enum('format', None, FORMATS, 'Whose parameter names the file '
                  'uses.', flag_values=FLAGS)
config_flags.DEFINE_config_file('config', None, 'MViT config, e.g. '
                                'configs/mvit_b.py:16.', flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Run directory to write (must not exist).',
                    flag_values=FLAGS)
for _name in ('checkpoint', 'format', 'config', 'out'):
  flags.mark_flag_as_required(_name, flag_values=FLAGS)

_PROGRAM = 'stat_jax.deploy.import_torch'


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed."""
  cli.no_positional(args)

  def action():
    step_dir = import_checkpoint(FLAGS.checkpoint, FLAGS.format, FLAGS.config,
                                 FLAGS.out)
    print(f'{_PROGRAM}: wrote {step_dir} from {FLAGS.checkpoint} '
          f'({FLAGS.format}); use --workdir={FLAGS.out}')
    return 0

  return report_user_errors(_PROGRAM, action)


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse_with_config(FLAGS, argv))


if __name__ == '__main__':
  cli.run_with_config(main)
