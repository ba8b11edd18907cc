"""The import graph of the tree, read from the source: no cycle, and the
input layer (stat_jax/data/) builds only on the bottom modules."""

import ast
import pathlib
import sys

from conftest import ROOT as ROOT_DIR

ROOT = pathlib.Path(ROOT_DIR)

PACKAGES = ('stat_jax', 'benchmarks', 'configs')
# What everything may import, and which imports nothing else of stat_jax:
# the error type, file paths, the tools' flags, the config schema (and the
# two packages' __init__, which import nothing).
BOTTOM = {'stat_jax.checks.errors', 'stat_jax.storage', 'stat_jax.cli',
          'stat_jax.defaults', 'stat_jax', 'stat_jax.checks'}


def module_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of PACKAGES and the top-level scripts."""
  files = {path.stem: path for path in root.glob('*.py')}
  for package in PACKAGES:
    for path in (root / package).rglob('*.py'):
      parts = path.relative_to(root).with_suffix('').parts
      files['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return files


def imported(module: str, path: pathlib.Path) -> set[str]:
  """The dotted names an `import` or `from ... import` anywhere in the file
  (function bodies included) may refer to: `from a import b` gives a and
  a.b, since b may be a module."""
  names = set()
  package = module if path.name == '__init__.py' else module.rpartition('.')[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      names.add(base)
      names.update(f'{base}.{alias.name}' for alias in node.names)
  return names


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
  """{module: the modules of the tree it imports}."""
  files = module_files(root)

  def in_tree(name):
    while name and name not in files:
      name = name.rpartition('.')[0]
    return name

  graph = {}
  for module, path in files.items():
    targets = {in_tree(name) for name in imported(module, path)}
    graph[module] = {t for t in targets if t and t != module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  order, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    order[node] = low[node] = len(order)
    stack.append(node)
    on_stack.add(node)
    for target in graph.get(node, ()):
      if target not in order:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], order[target])
    if low[node] == order[node]:
      component = []
      while not component or component[-1] != node:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for node in sorted(graph):
    if node not in order:
      visit(node)
  return found


def test_the_cycle_finder_finds_a_cycle_and_passes_a_chain():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [
      ['a', 'b', 'c']]
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []


def test_imported_reads_function_level_and_relative_imports(tmp_path):
  path = tmp_path / 'm.py'
  path.write_text('def f():\n  from . import sibling\n  import x.y\n')
  assert imported('pkg.m', path) == {'pkg', 'pkg.sibling', 'x.y'}


def test_no_module_of_the_tree_imports_itself_back():
  assert cycles(import_graph(ROOT)) == []


def test_the_input_layer_builds_only_on_the_bottom_modules():
  graph = import_graph(ROOT)
  outside = {
      (module, target) for module, targets in graph.items()
      if module.startswith('stat_jax.data') for target in targets
      if not target.startswith('stat_jax.data') and target not in BOTTOM}
  assert outside == set()
  upward = {(module, target) for module in BOTTOM
            for target in graph[module] if target not in BOTTOM}
  assert upward == set()


def test_the_library_imports_no_benchmark_or_config():
  graph = import_graph(ROOT)
  assert {(module, target) for module, targets in graph.items()
          if module.startswith('stat_jax') for target in targets
          if not target.startswith('stat_jax')} == set()


def test_no_module_takes_a_standard_library_name():
  names = {module.rpartition('.')[2] for module in module_files(ROOT)}
  assert names & set(sys.stdlib_module_names) == set()
