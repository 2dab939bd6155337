"""The project's import graph: no import cycle, no module imports another module's private names.

Every module of `distillm2_kernels/` and `benchmarks/` is parsed with `ast` (nothing is imported), and each
`import` / `from ... import` that names a module of the project becomes an edge.

- **Cycles.** Both the imports at module level and the imports inside functions count. A function-local
  import defers the cycle past the interpreter's import time, but the two modules still depend on each
  other, which is what the rule is about. `from package import name` is an edge to `package.name` when that
  is a module, else to `package` (its `__init__`). A module's import of its own parent packages, which
  Python performs implicitly, is not an edge.
- **Private names.** A leading-underscore *name* (`_collate`, `_sequence_mean`) belongs to the module that
  defines it: no other module may import it (`from m import _x`) or reach it as an attribute (`m._x`, with
  `m` bound to a project module). A leading-underscore *module* (`_inputs`, `_measure`) is internal to its
  package: it may be imported from inside the package that contains it (at any depth), never from outside.
  Dunder names (`__version__`) are public.

Tests are not checked: a test may reach into a module's internals to check them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distillm2_kernels", "benchmarks")

# Violations that other work in progress removes (issue 13, the kernels' side). The lead empties this list
# at merge; a violation that is not in it fails, and an entry that no longer occurs fails too.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted name -> source file of every module of the project's packages."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            modules[_module_name(path, root)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    """The absolute module name that `from <node.module> import ...` in `module` refers to."""
    if node.level == 0:
        return node.module or ""
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


class _Imports(ast.NodeVisitor):
    """Collect (target module, imported name or None, function-local?) and the names bound to modules."""

    def __init__(self, module: str, modules: dict[str, Path]):
        self.module, self.modules = module, modules
        self.depth = 0
        self.imports: list[tuple[str, str | None, bool, int]] = []
        self.module_aliases: dict[str, str] = {}  # local name -> project module
        self.attribute_uses: list[tuple[str, str, int]] = []  # (module alias, attribute, line)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if alias.name in self.modules:
                self.imports.append((alias.name, None, self.depth > 0, node.lineno))
                if alias.asname:
                    self.module_aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom):
        source = _resolve(self.module, node, self.modules)
        if source not in self.modules:
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.modules:
                self.imports.append((submodule, None, self.depth > 0, node.lineno))
                self.module_aliases[alias.asname or alias.name] = submodule
            else:
                self.imports.append((source, alias.name, self.depth > 0, node.lineno))

    def visit_Attribute(self, node: ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in self.module_aliases:
            self.attribute_uses.append((node.value.id, node.attr, node.lineno))
        self.generic_visit(node)


def _parse(modules: dict[str, Path]) -> dict[str, _Imports]:
    parsed = {}
    for name, path in modules.items():
        visitor = _Imports(name, modules)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        parsed[name] = visitor
    return parsed


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module_allowed(importer: str, target: str) -> bool:
    """A `_module` may be imported only from inside the package that contains it."""
    parts = target.split(".")
    for index, part in enumerate(parts):
        if _is_private(part):
            owner = ".".join(parts[:index])
            if not (importer == owner or importer.startswith(owner + ".")):
                return False
    return True


def import_graph(parsed: dict[str, _Imports]) -> dict[str, set[str]]:
    """Importer -> the project modules it imports (module level and function-local)."""
    graph = {name: set() for name in parsed}
    for name, visitor in parsed.items():
        for target, _, _, _ in visitor.imports:
            if target != name and not name.startswith(target + "."):  # a parent package: implicit
                graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every strongly connected component with more than one module (Tarjan), as a sorted tuple."""
    index, low, stack, on_stack, components = {}, {}, [], set(), set()
    counter = [0]

    def visit(node: str):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.add(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def private_imports(parsed: dict[str, _Imports]) -> set[tuple[str, str]]:
    """(importer, the private `module.name` or `_module` it reaches) for every violation."""
    found = set()
    for importer, visitor in parsed.items():
        for target, name, _, _ in visitor.imports:
            if not _private_module_allowed(importer, target):
                found.add((importer, target))
            if name is not None and _is_private(name) and target != importer:
                found.add((importer, f"{target}.{name}"))
        for alias, attribute, _ in visitor.attribute_uses:
            target = visitor.module_aliases[alias]
            if _is_private(attribute) and target != importer and f"{target}.{attribute}" not in parsed:
                found.add((importer, f"{target}.{attribute}"))
    return found


def test_the_scan_finds_the_project_and_its_imports():
    modules = project_modules()
    assert {"distillm2_kernels", "distillm2_kernels.trainer.cli", "benchmarks.runner"} <= set(modules)
    graph = import_graph(_parse(modules))
    assert "distillm2_kernels.functional" in graph["distillm2_kernels"]
    assert "distillm2_kernels.trainer.training" in graph["distillm2_kernels.trainer.cli"]


def test_the_checks_catch_a_cycle_and_a_private_import(tmp_path):
    """The detectors on a made-up graph: a function-local cycle and the three kinds of private import."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(graph) == {("p.a", "p.b", "p.c")}
    source = {
        "p/__init__.py": "",
        "p/_internal.py": "",
        "p/a.py": "from . import b\n\n\ndef _helper(): pass\n",
        "p/b.py": "def f():\n    from .a import _helper\n",
        "p/c.py": "from . import a\nx = a._helper\n",
        "p/d.py": "from p._internal import x\n",  # allowed: inside the package p
        "q/__init__.py": "",
        "q/e.py": "import p._internal as internal\n",
    }
    for name, text in source.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    parsed = _parse(project_modules(tmp_path, ("p", "q")))
    assert parsed["p.b"].imports == [("p.a", "_helper", True, 2)]
    assert private_imports(parsed) == {("p.b", "p.a._helper"), ("p.c", "p.a._helper"), ("q.e", "p._internal")}
    assert find_cycles(import_graph(parsed)) == {("p.a", "p.b")}  # b's import of a is function-local: it counts


def test_no_import_cycle():
    cycles = find_cycles(import_graph(_parse(project_modules())))
    assert cycles - KNOWN_CYCLES == set(), f"import cycles: {sorted(cycles - KNOWN_CYCLES)}"
    assert KNOWN_CYCLES - cycles == set(), f"fixed, remove from KNOWN_CYCLES: {sorted(KNOWN_CYCLES - cycles)}"


def test_no_module_imports_another_modules_private_names():
    found = private_imports(_parse(project_modules()))
    new = found - KNOWN_PRIVATE_IMPORTS
    assert new == set(), f"private names imported across modules: {sorted(new)}"
    fixed = KNOWN_PRIVATE_IMPORTS - found
    assert fixed == set(), f"fixed, remove from KNOWN_PRIVATE_IMPORTS: {sorted(fixed)}"


if __name__ == "__main__":
    parsed = _parse(project_modules())
    print("cycles:", *sorted(find_cycles(import_graph(parsed))), sep="\n  ")
    print("private imports:", *sorted(private_imports(parsed)), sep="\n  ")
