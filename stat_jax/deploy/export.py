"""Export a trained checkpoint to other frameworks.

  python -m stat_jax.deploy.export --workdir=runs/k400_16 [--checkpoint=best] \
      --out=exports/k400_16 [--formats=savedmodel,onnx,safetensors,stablehlo]

Every format serves stat_jax.deploy.inference.serving_fn: uint8 RGB video
[batch, T, H, W, 3] (batch dynamic, T/H/W those of the run's config) ->
logits and probabilities float32 [batch, classes], normalisation inside.

  savedmodel/          TF SavedModel (jax2tf), signature serving_default:
                       video -> {logits, probabilities}; loads without JAX
  model.onnx           ONNX (jax2onnx, opset ONNX_OPSET): video -> logits,
                       probabilities
  params.safetensors   the parameters by dotted name (stat_jax/param_names.py)
  params.json          config, class names, shape and layout of each tensor
  model.stablehlo      jax.export serialization (symbolic batch), reload with
                       jax.export.deserialize(...).call(video)
  example_input.npy    uint8 [2, T, H, W, 3] and the JAX model's logits for it
  example_logits.npy
  manifest.json        config, classes, input spec, formats, versions, step

The export is written into a hidden temporary folder beside --out and
renamed to --out when complete: a folder at --out is always a whole export.
"""

import json
import os
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

import flax  # pylint: disable=g-import-not-at-top
import jax
from absl import flags
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf
from jax2onnx import to_onnx

from stat_jax import cli, defaults, param_names, storage
from stat_jax.deploy import inference
from stat_jax.checks.errors import UserError, report_user_errors

ONNX_OPSET = 21  # runs in ONNX Runtime 1.18 and later
# StableHLO and SavedModel carry one lowering per platform.
PLATFORMS = ('cpu', 'cuda')
EXAMPLE_BATCH = 2


def _batch_spec(data, batch):
  """uint8 [batch, T, H, W, 3]; batch an int or a symbolic dimension."""
  return jax.ShapeDtypeStruct((batch, *defaults.clip_shape(data)), jnp.uint8)


# ------------------------------------------------------------- formats ---

def write_savedmodel(restored, folder) -> dict:
  """Parameters as TF variables, the model as one XlaCallModule op."""
  leaves, treedef = jax.tree.flatten(restored.params)
  apply = inference.serving_fn(restored.parts, restored.config.data)
  shape = defaults.clip_shape(restored.config.data)
  tf_apply = jax2tf.convert(
      lambda flat, video: apply(jax.tree.unflatten(treedef, flat), video),
      polymorphic_shapes=[None, f'(b, {", ".join(map(str, shape))})'],
      with_gradient=False, native_serialization_platforms=PLATFORMS)
  module = tf.Module()
  module.params = [tf.Variable(np.asarray(leaf), trainable=False)
                   for leaf in leaves]

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, *shape], tf.uint8, name='video')])
  def serve(video):
    logits, probabilities = tf_apply(module.params, video)
    return {'logits': logits, 'probabilities': probabilities}

  module.serve = serve
  tf.saved_model.save(module, os.path.join(folder, 'savedmodel'),
                      signatures={'serving_default': serve})
  return {'path': 'savedmodel', 'signature': 'serving_default',
          'platforms': list(PLATFORMS)}


def write_onnx(restored, folder) -> dict:
  """Parameters as initializers; 'batch' is a named dynamic dimension."""
  apply = inference.serving_fn(restored.parts, restored.config.data)

  to_onnx(lambda video: apply(restored.params, video), [_batch_spec(restored.config.data, 'batch')],
          model_name='stat', opset=ONNX_OPSET, input_names=['video'],
          output_names=['logits', 'probabilities'], return_mode='file',
          output_path=os.path.join(folder, 'model.onnx'))
  return {'path': 'model.onnx', 'opset': ONNX_OPSET}


def write_safetensors(restored, folder) -> dict:
  param_names.save_safetensors(restored.params,
                               os.path.join(folder, 'params.safetensors'))
  layouts = param_names.layouts(restored.config)
  arrays = param_names.named_arrays(restored.params)
  tensors = {name: {'shape': list(array.shape), 'dtype': str(array.dtype),
                    'layout': layouts[name]} for name, array in arrays.items()}
  _write_json(os.path.join(folder, 'params.json'), {
      'config': restored.config.to_dict(), 'classes': restored.classes,
      'tensors': tensors})
  return {'path': 'params.safetensors', 'index': 'params.json'}


def write_stablehlo(restored, folder) -> dict:
  """Parameters as constants of the module; a symbolic 'batch' dimension."""
  batch, = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(restored.classify),
                               platforms=PLATFORMS)(
                                   _batch_spec(restored.config.data, batch))
  with open(os.path.join(folder, 'model.stablehlo'), 'wb') as f:
    f.write(exported.serialize())
  return {'path': 'model.stablehlo', 'platforms': list(PLATFORMS)}


FORMATS = {'savedmodel': write_savedmodel, 'onnx': write_onnx,
           'safetensors': write_safetensors, 'stablehlo': write_stablehlo}


# -------------------------------------------------------------- export ---

def check_formats(formats) -> list[str]:
  """The requested format names, in order, without repeats; unknown -> error."""
  unknown = [name for name in formats if name not in FORMATS]
  if unknown or not formats:
    named = ', '.join(map(repr, unknown)) or '(none given)'
    raise UserError(f'unknown export format(s) {named}; choose from '
                     f'{", ".join(FORMATS)}')
  return list(dict.fromkeys(formats))


def _write_format(name, restored, folder) -> dict:
  try:
    return FORMATS[name](restored, folder)
  except Exception as error:
    raise RuntimeError(f'{name} export of checkpoint step {restored.step} '
                       f'failed: {type(error).__name__}: {error}') from error


def _write_json(path, value):
  with open(path, 'w') as f:
    json.dump(value, f, indent=1)


def _manifest(restored, workdir, formats: dict) -> dict:
  data = restored.config.data
  clip = defaults.clip_shape(data)
  return {
      'checkpoint': {'workdir': storage.absolute(workdir),
                     'step': restored.step},
      'config': restored.config.to_dict(),
      'classes': restored.classes,
      'input': {'name': 'video', 'dtype': 'uint8', 'shape': ['batch', *clip],
                'channels': 'RGB', 'range': [0, 255],
                'normalisation': {'mean': list(data.mean),
                                  'std': list(data.std),
                                  'applied': 'inside the model'}},
      'outputs': {name: {'dtype': 'float32',
                         'shape': ['batch', restored.config.model.num_classes]}
                  for name in ('logits', 'probabilities')},
      'formats': formats,
      'examples': {'input': 'example_input.npy',
                   'logits': 'example_logits.npy'},
      'versions': {'jax': jax.__version__, 'flax': flax.__version__},
  }


def export_checkpoint(workdir: str, out: str, formats: list[str],
                      which: str = 'latest') -> dict:
  """Writes the export folder `out`; returns its manifest."""
  formats = check_formats(formats)
  out = storage.absolute(out)
  _check_out_is_new(out)
  restored = inference.restore(workdir, which)
  if storage.is_remote(out):
    # Written locally, then uploaded with manifest.json last: a reader that
    # finds the manifest finds every file it lists.
    with tempfile.TemporaryDirectory(prefix='stat-jax-export-') as staging:
      manifest = _write_folder(restored, workdir, formats, staging)
      storage.upload_folder(staging, out, last='manifest.json')
    return manifest
  os.makedirs(os.path.dirname(out), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.partial-',
                             dir=os.path.dirname(out))
  try:
    manifest = _write_folder(restored, workdir, formats, staging)
    os.chmod(staging, 0o755)  # mkdtemp made it private
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def _check_out_is_new(out: str) -> None:
  """--out names nothing yet (and, in a bucket, a place we may write)."""
  if storage.is_remote(out):
    if tf.io.gfile.exists(out):
      raise FileExistsError(f'--out={out} exists; remove it or choose another')
    try:
      storage.write_probe(out)
    except tf.errors.OpError as error:
      raise UserError(f'--out={out} is not writable '
                      f'({storage.reason(error)})') from error
    return
  if os.path.lexists(out):
    what = ('is a symbolic link' + ('' if os.path.exists(out) else
                                    f' to a missing {os.readlink(out)}')
            if os.path.islink(out) else 'exists')
    raise FileExistsError(f'--out={out} {what}; remove it or choose another')


def _write_folder(restored, workdir, formats, folder) -> dict:
  """Every file of the export into the local `folder`; the manifest."""
  example = np.random.default_rng(0).integers(
      0, 256, (EXAMPLE_BATCH, *defaults.clip_shape(restored.config.data)),
      dtype=np.uint8)
  np.save(os.path.join(folder, 'example_input.npy'), example)
  np.save(os.path.join(folder, 'example_logits.npy'),
          np.asarray(restored.classify(example)[0]))
  written = {name: _write_format(name, restored, folder) for name in formats}
  manifest = _manifest(restored, workdir, written)
  _write_json(os.path.join(folder, 'manifest.json'), manifest)
  return manifest


FLAGS = flags.FlagValues()  # this tool's own (stat_jax/cli.py)
flags.DEFINE_string('workdir', None, 'Training run directory.',
                    flag_values=FLAGS, required=True)
flags.DEFINE_string('checkpoint', 'latest', "'latest', 'best' or a step number.",
                    flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Export directory to create.',
                    flag_values=FLAGS, required=True)
flags.DEFINE_list('formats', list(FORMATS),
                  f'Comma-separated subset of {",".join(FORMATS)}.',
                  flag_values=FLAGS)


def _export() -> int:
  manifest = export_checkpoint(FLAGS.workdir, FLAGS.out, FLAGS.formats,
                               FLAGS.checkpoint)
  files = sorted(name.rstrip('/') for name in tf.io.gfile.listdir(FLAGS.out))
  print(f'Exported step {manifest["checkpoint"]["step"]} of {FLAGS.workdir} '
        f'to {FLAGS.out}: {", ".join(files)}')
  return 0


def run(args: list[str]) -> int:
  """The tool, FLAGS parsed; `args`: the arguments that are not flags."""
  cli.no_positional(args)
  return report_user_errors('stat_jax.deploy.export', _export,
                                user_errors=(FileExistsError,))


def main(argv: list[str]) -> int:
  """The command line after the program name, run in this process."""
  return run(cli.parse(FLAGS, argv))


if __name__ == '__main__':
  cli.run(run, FLAGS)
