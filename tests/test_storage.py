"""stat_jax/storage.py: paths of a run, local or gs://, taken apart by hand
(the gs:// end-to-end checks are in test_gcs.py)."""

import os

import pytest

from stat_jax import storage


@pytest.mark.parametrize('path, parent, name, stem', [
    ('gs://b/run/eval_step3.json', 'gs://b/run', 'eval_step3.json',
     'gs://b/run/eval_step3'),
    ('gs://b/run/', 'gs://b', 'run', 'gs://b/run/'),
    ('gs://b', 'gs://b', 'b', 'gs://b'),
    ('runs/a.b/report.json', 'runs/a.b', 'report.json', 'runs/a.b/report'),
    ('runs/a.b/.hidden', 'runs/a.b', '.hidden', 'runs/a.b/.hidden'),
    ('report', '', 'report', 'report'),
])
def test_paths_are_taken_apart_without_os_path(path, parent, name, stem):
  assert storage.parent(path) == parent
  assert storage.basename(path) == name
  assert storage.strip_extension(path) == stem


def test_a_url_stays_as_given_and_a_local_path_becomes_absolute(tmp_path,
                                                                monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert storage.absolute('gs://b/run') == 'gs://b/run'  # not <cwd>/gs:/b/run
  assert storage.absolute('run') == os.path.join(str(tmp_path), 'run')
  assert storage.join('gs://b', 'run', 'checkpoints') == 'gs://b/run/checkpoints'
  assert storage.is_remote('gs://b/x') and not storage.is_remote('b/x')


def test_text_is_written_whole_and_appended(tmp_path):
  path = str(tmp_path / 'new' / 'log.jsonl')
  storage.write_text(path, 'a\n')
  storage.append_text(path, 'b\n')
  storage.write_text(str(tmp_path / 'new' / 'empty.txt'), '')
  assert storage.read_text(path) == 'a\nb\n'
  assert sorted(os.listdir(tmp_path / 'new')) == ['empty.txt', 'log.jsonl']


def test_a_local_copy_reaches_a_local_path_directly(tmp_path):
  target = str(tmp_path / 'picture.png')
  with storage.local_copy_for_writing(target) as local:
    assert local == target


def test_the_reason_of_an_error_is_one_line():
  error = OSError(13, 'Permission denied\n  at line 2')
  assert storage.reason(error) == 'Permission denied at line 2'
