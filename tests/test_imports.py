"""Package hygiene, checked on the source with ``ast`` (nothing is imported):

- no module uses another module's private name (``_x``): neither ``from m import _x`` nor
  ``import m`` / ``from pkg import m`` followed by ``m._x``;
- no import circle among the project's modules. Every import statement counts, the ones inside functions
  too (they only postpone the circle), except those under ``if TYPE_CHECKING:``.

An import edge goes to the module named: ``from pkg import sub`` to ``pkg.sub`` when that is a module,
otherwise to ``pkg`` (a name from its ``__init__``). Parent packages' ``__init__`` files are not edges,
or every package that re-exports its submodules would be a circle with them.

The positive control (``test_checker_finds_violations``) builds a small package in ``tmp_path`` that
breaks both rules and asserts that the checker names each break.
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
# the installed package name of each source folder (setup.cfg's package_dir)
ROOTS = {"mixtral_jax": REPO / "mixtral_jax", "mixtral_jax.sharding": REPO / "sharding",
         "mixtral_jax.train": REPO / "train", "mixtral_jax.eval": REPO / "eval"}


def find_modules(roots: dict[str, pathlib.Path]) -> dict[str, pathlib.Path]:
  """{dotted module name: file} for every ``.py`` under each root (``__init__.py`` names the package)."""
  out = {}
  for prefix, root in roots.items():
    for path in sorted(root.rglob("*.py")):
      parts = path.relative_to(root).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join((prefix,) + parts)] = path
  return out


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__") and name != "_"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
  """ids of the nodes under ``if TYPE_CHECKING:`` (imports that never run)."""
  skip = set()
  for node in ast.walk(tree):
    test = getattr(node, "test", None)
    if isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                     or getattr(test, "attr", None) == "TYPE_CHECKING"):
      skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
  return skip


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  """The absolute module name an ``ImportFrom`` reads from (resolving ``from .. import x``)."""
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


class _ModuleScan:
  """One module's import edges, its ``from m import _x`` uses and its ``m._x`` attribute uses."""

  def __init__(self, name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]):
    self.name, self.modules = name, modules
    self.edges: set[str] = set()
    self.private: list[str] = []
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    skip = _type_checking_nodes(tree)
    aliases: dict[str, str] = {}  # local name -> project module it is bound to
    for node in ast.walk(tree):
      if id(node) in skip:
        continue
      if isinstance(node, ast.Import):
        self._import(node, aliases)
      elif isinstance(node, ast.ImportFrom):
        self._import_from(node, _absolute(name, is_package, node), aliases)
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute) and _is_private(node.attr):
        target = aliases.get(_dotted(node.value) or "")
        if target and target != name:
          self.private.append(f"{name} uses {target}.{node.attr}")

  def _import(self, node: ast.Import, aliases: dict[str, str]) -> None:
    for alias in node.names:
      if alias.name in self.modules:
        self.edges.add(alias.name)
        if alias.asname:
          aliases[alias.asname] = alias.name
        else:  # ``import a.b.c`` binds ``a``; ``a.b.c._x`` is resolved through the dotted chain
          parts = alias.name.split(".")
          for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in self.modules:
              aliases[".".join(parts[:i])] = ".".join(parts[:i])

  def _import_from(self, node: ast.ImportFrom, source: str, aliases: dict[str, str]) -> None:
    for alias in node.names:
      sub = f"{source}.{alias.name}"
      if sub in self.modules:  # a submodule
        self.edges.add(sub)
        aliases[alias.asname or alias.name] = sub
      elif source in self.modules:  # a name defined in (or re-exported by) ``source``
        self.edges.add(source)
        if _is_private(alias.name) and source != self.name:
          self.private.append(f"{self.name} imports {source}.{alias.name}")


def _dotted(node: ast.AST) -> str | None:
  """``a.b.c`` for a Name/Attribute chain, else None."""
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    head = _dotted(node.value)
    return f"{head}.{node.attr}" if head else None
  return None


def scan(roots: dict[str, pathlib.Path]) -> tuple[list[str], dict[str, set[str]]]:
  """(private-name violations, import graph {module: modules it imports}) of the tree under ``roots``."""
  modules = find_modules(roots)
  private, graph = [], {}
  for name, path in modules.items():
    s = _ModuleScan(name, path, modules)
    private += s.private
    graph[name] = s.edges - {name}
  return sorted(set(private)), graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One shortest circle per strongly connected component of more than one module (Tarjan's SCCs, then a
  breadth-first search from the component's first module back to itself), e.g. ``[a, b, a]``."""
  index, low, stack, on_stack, comps = {}, {}, [], set(), []

  def strongconnect(v):  # recursion depth is bounded by the module count (a few hundred)
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        strongconnect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        comps.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  return [_shortest_cycle(graph, comp) for comp in sorted(comps)]


def _shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
  start, members = comp[0], set(comp)
  parent, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v] & members):
        if w == start:
          path = [v]
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1] + [start]
        if w not in parent:
          parent[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"{comp} is not strongly connected")


def test_no_private_names_across_modules():
  private, _ = scan(ROOTS)
  assert not private, ("modules use other modules' private names; make the name public (and documented) "
                       "in its home module, or move the code:\n  " + "\n  ".join(private))


def test_no_import_cycles():
  _, graph = scan(ROOTS)
  cycles = find_cycles(graph)
  assert not cycles, ("import circles among the project's modules (function-level imports count); move the "
                      "shared part into a module both import:\n  " + "\n  ".join(" -> ".join(c) for c in cycles))


def test_checker_sees_the_whole_tree():
  """The scan must cover every source folder and find real edges (an empty graph would pass vacuously)."""
  _, graph = scan(ROOTS)
  for prefix in ROOTS:
    assert any(m == prefix or m.startswith(prefix + ".") for m in graph), prefix
  assert "mixtral_jax.config" in graph["mixtral_jax.model"]
  assert "mixtral_jax.train.step" in graph["mixtral_jax.train.loop"]  # a relative import, resolved


def test_checker_finds_violations(tmp_path):
  """Positive control: a fake package with each kind of private use and a three-module circle closed by
  a function-level import; one clean module that must not be reported."""
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  files = {
      "__init__.py": "",
      "a.py": "from pkg import b\n_SECRET = 1\n",
      "b.py": "from .sub import c\n",
      "sub/__init__.py": "",
      "sub/c.py": "def f():\n  from pkg.a import _SECRET\n  return _SECRET\n",
      "d.py": "import pkg.a\nfrom pkg import b as bee\nx = pkg.a._SECRET + bee._hidden\n",
      "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from pkg.d import _y\n_z = 1\nw = _z\n",
  }
  for rel, text in files.items():
    (pkg / rel).write_text(text)
  private, graph = scan({"pkg": pkg})
  assert private == ["pkg.d uses pkg.a._SECRET", "pkg.d uses pkg.b._hidden", "pkg.sub.c imports pkg.a._SECRET"]
  assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
  assert graph["pkg.e"] == set()  # TYPE_CHECKING imports never run
