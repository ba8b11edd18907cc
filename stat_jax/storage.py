"""Paths of a run, local or in object storage (gs://bucket/...).

Every file a run, the converter, eval, predict, export and explain read or
write goes through tf.io.gfile, which speaks to local disks and to GCS
alike. A URL (`scheme://...`) never reaches os.path or pathlib: they would
take `gs://b/run` for the local folder `<cwd>/gs:/b/run`, and each host of
a pod would then write its own copy of the run.
"""

import contextlib
import os
import tempfile
import uuid

import tensorflow as tf


def is_remote(path: str) -> bool:
  """A URL such as gs://bucket/run, not a local path."""
  return '://' in path


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is."""
  return path if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
  return tf.io.gfile.join(path, *parts)


def parent(path: str) -> str:
  """The folder holding `path` ('' for a bare local name)."""
  if not is_remote(path):
    return os.path.dirname(path)
  scheme, _, rest = path.partition('://')
  folder = rest.rstrip('/').rpartition('/')[0]
  return f'{scheme}://{folder or rest.rstrip("/")}'


def basename(path: str) -> str:
  return path.rstrip('/').rpartition('/')[2]


def strip_extension(path: str) -> str:
  """`path` without the extension of its last part ('a/b.json' -> 'a/b')."""
  name = basename(path)
  stem, dot, _ = name.rpartition('.')
  return path[:len(path) - len(name)] + stem if dot and stem else path


def reason(error: BaseException) -> str:
  """One line of what went wrong: TF's GCS errors span lines and quote the
  server's JSON."""
  text = getattr(error, 'message', None) or getattr(
      error, 'strerror', None) or str(error) or type(error).__name__
  return ' '.join(str(text).split())[:300]


def make_folder(path: str) -> None:
  """Makes the local folder `path` and its parents. A bucket has no
  folders to make (and TF's makedirs does not return for a bucket that does
  not exist): objects are written under any prefix."""
  if path and not is_remote(path):
    tf.io.gfile.makedirs(path)


def read_text(path: str) -> str:
  with tf.io.gfile.GFile(path) as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """write_bytes of `text` in UTF-8."""
  write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
  """`path` appears with all of `data` or not at all. A GCS object does so
  by itself; a local file is written beside it and renamed over it."""
  make_folder(parent(path))
  target = path if is_remote(path) else f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with tf.io.gfile.GFile(target, 'wb') as f:
      f.write(data)
    if target != path:
      tf.io.gfile.rename(target, path, overwrite=True)
  except BaseException:
    if target != path and tf.io.gfile.exists(target):
      tf.io.gfile.remove(target)
    raise


def append_text(path: str, text: str) -> None:
  """Adds `text` at the end of `path` (GCS rewrites the object: fine for
  the small logs appended here)."""
  with tf.io.gfile.GFile(path, 'a') as f:
    f.write(text)


@contextlib.contextmanager
def local_copy_for_writing(path: str):
  """A local file name to write (for writers that take only local paths,
  e.g. matplotlib, ONNX), copied to `path` on exit when `path` is remote."""
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix='stat-jax-') as folder:
    local = os.path.join(folder, basename(path))
    yield local
    tf.io.gfile.copy(local, path, overwrite=True)


def upload_folder(local: str, remote: str, last: str) -> None:
  """Copies the files under the local folder `local` to `remote`, the file
  named `last` after all others."""
  files = [os.path.relpath(os.path.join(folder, name), local)
           for folder, _, names in os.walk(local) for name in names]
  for name in sorted(files, key=lambda name: name == last):
    target = join(remote, *name.split(os.sep))
    tf.io.gfile.copy(os.path.join(local, name), target, overwrite=True)


def write_probe(directory: str) -> None:
  """Creates and removes a file in `directory` (made if missing, locally);
  raises what the disk or the bucket said."""
  if not is_remote(directory):
    os.makedirs(directory, exist_ok=True)
    descriptor, probe = tempfile.mkstemp(prefix='.write-probe-', dir=directory)
    os.close(descriptor)
    os.remove(probe)
    return
  probe = join(directory, f'.write-probe-{uuid.uuid4().hex}')
  handle = tf.io.gfile.GFile(probe, 'w')
  try:
    handle.write('')
    handle.close()
  finally:
    # A GCS file that failed to close retries its upload when destroyed:
    # destroy it now, not whenever the exception's frames go.
    del handle
  tf.io.gfile.remove(probe)
