"""The package's import graph, read statically: acyclic, and the library never imports the workbench.

Every ``import`` counts, including those inside functions (a lazy import hides a cycle from the
interpreter, not from a reader); only imports under ``if TYPE_CHECKING:`` are left out, because
they never run. A cycle makes module order matter and splits one job over two files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import peftlab

ROOT = Path(peftlab.__file__).parent
PACKAGE = "peftlab"


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every peftlab module ``module`` imports at run time (a from-import of a name counts as its module)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py")
        # A package's own __init__ runs on import of any submodule; edges to it from its own
        # members are how Python works, not a design choice, so only edges to modules count.
        graph[name] = {m for m in imported if m in files and m != name and not name.startswith(m + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_function_level_imports():
    tree = ast.parse("def f():\n    from peftlab import config\n")
    assert "peftlab.config" in _imports(tree, "peftlab.x", is_package=False)
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import peftlab.config\n")
    assert "peftlab.config" not in _imports(guarded, "peftlab.x", is_package=False)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the package
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ``python -m peftlab`` is the workbench's command line, so it is the one library file that may start it.
WORKBENCH_ENTRY_POINTS = {"peftlab.__main__"}


def test_library_never_imports_the_workbench():
    offenders = {
        module: sorted(m for m in imports if m == "peftlab.lab" or m.startswith("peftlab.lab."))
        for module, imports in import_graph().items()
        if not (module == "peftlab.lab" or module.startswith("peftlab.lab.")) and module not in WORKBENCH_ENTRY_POINTS
    }
    assert {m: i for m, i in offenders.items() if i} == {}


REPO = ROOT.parent.parent


def _named_modules(tree: ast.AST, package: str) -> set[tuple[str, str | None]]:
    """(module, imported name or None) for every peftlab import, TYPE_CHECKING blocks included."""
    found: set[tuple[str, str | None]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name, None) for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] == PACKAGE:
                found.update((base, alias.name) for alias in node.names)
    return found


def test_every_peftlab_import_names_a_module_that_exists():
    """A renamed module leaves no stale import behind, not even in a function body, a TYPE_CHECKING
    block or a benchmark that no test runs (those fail only when someone runs that line)."""
    modules = set(import_graph())
    public = set(peftlab.__all__)
    stale = []
    for folder in ("src", "tests", "benchmarks", "tools", "examples"):
        for path in sorted((REPO / folder).rglob("*.py")):
            in_package = path.is_relative_to(ROOT)
            package = _module_name(path) if in_package else ""
            if in_package and path.name != "__init__.py":
                package = package.rpartition(".")[0]
            for module, name in _named_modules(ast.parse(path.read_text(encoding="utf-8")), package):
                ok = module in modules and (
                    name is None or f"{module}.{name}" in modules or module != PACKAGE or name in public or name == "__version__"
                )
                if not ok:
                    stale.append(f"{path.relative_to(REPO)}: {module}{'' if name is None else ' -> ' + name}")
    lazy = {m for m in vars(peftlab).get("_LAZY", {}).values()}
    stale += [f"peftlab._LAZY: {m}" for m in sorted(lazy - modules)]
    assert stale == []


def test_package_members_never_import_their_own_package_init():
    """A module inside a package (a method family such as ``methods/lora``) imports its siblings'
    modules, never names from its own package's ``__init__``: that ``__init__`` imports the members,
    so such an import reads a half-initialised module and works or fails by import order. The root
    package is the exception: its public names are lazy (``_LAZY``), so the workbench may use them."""
    modules = set(import_graph())
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module, imported in _named_modules(ast.parse(path.read_text(encoding="utf-8")), package):
            inside = name.startswith(module + ".") and module != PACKAGE
            if inside and (imported is None or f"{module}.{imported}" not in modules):
                offenders.append(f"{name}: from {module} import {imported}")
    assert offenders == []
