"""The package's shape (docs/design.md): imports only go down the layers, no import cycles, no
re-exports through package `__init__`s, and modules small enough to read in one sitting."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'affectjax')
MAX_LINES = 400

# Lowest first. A module may import modules of its own layer or of lower layers, never higher.
LAYERS = (
    ('files', 'labels', 'logs', 'optim', 'parallel', 'workdir'),  # of the package, only this layer
    ('data', 'face'),  # readers, sources, pipelines, the synthetic generator; face detection
    ('models', 'weights'),
    ('losses', 'metrics', 'checkpoint', 'predictions'),
    ('train', 'config'),  # the pure steps; the config schema
    ('kinds',),  # image / temporal runs
    ('runs',),  # the resolved config and the run
    ('evaluation', 'report', 'timeline'),  # a pass over a split; its figures; a video's table
    ('trainer', 'inference', 'convert'),  # the loop; modes from a checkpoint; the converter
    ('ensemble', 'oof', 'ablate', 'analyze'),  # run averages; OOF features; ablations; videos
    ('main',),
)


def _module_names() -> dict:
  """'affectjax.data.index' -> its file, for every module of the package."""
  names = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        names['.'.join(parts)] = path
  return names


MODULES = _module_names()


def _imports(path: str) -> set:
  """The package modules `path` imports, at any depth of its code (deferred imports too)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found.update(f'{node.module}.{alias.name}' for alias in node.names)
  return {name for name in found if name in MODULES}


def _layer(module: str) -> int:
  top = module.split('.')[1] if module.count('.') else ''
  for level, names in enumerate(LAYERS):
    if top in names:
      return level
  raise AssertionError(f'{module} is in no layer of tests/test_architecture.py: add it')


GRAPH = {module: _imports(path) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
  for module in MODULES:
    if module != 'affectjax':
      _layer(module)


@pytest.mark.parametrize('module', sorted(m for m in MODULES if m != 'affectjax'))
def test_imports_only_go_down_the_layers(module):
  upward = [name for name in GRAPH[module]
            if name != 'affectjax' and _layer(name) > _layer(module)]
  assert not upward, f'{module} imports a higher layer: {upward}'


def test_no_import_cycles():
  done, stack = set(), []

  def visit(module):
    if module in stack:
      raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(module):] + [module]))
    if module in done:
      return
    stack.append(module)
    for name in GRAPH[module]:
      if name != module and not module.startswith(name + '.'):  # a package's own submodules
        visit(name)
    stack.pop()
    done.add(module)

  for module in sorted(GRAPH):
    visit(module)


def test_package_inits_re_export_nothing():
  for module, path in MODULES.items():
    if path.endswith('__init__.py'):
      tree = ast.parse(open(path).read(), path)
      assert all(isinstance(node, ast.Expr) for node in tree.body), (
          f'{path}: a package __init__ holds only its docstring (import names from the module '
          'that defines them)')


@pytest.mark.parametrize('module', sorted(MODULES))
def test_modules_stay_readable(module):
  lines = sum(1 for _ in open(MODULES[module]))
  assert lines <= MAX_LINES, f'{MODULES[module]}: {lines} lines (at most {MAX_LINES}: split it)'
