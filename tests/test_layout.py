"""The house, drawn from the imports: the general library knows nothing of the book, no module imports
another's private names, and there is no import cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vefi"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(module imported, names taken from it) for every vefi import of ``path``, at any depth."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vefi":
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vefi":
                    yield alias.name, []


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GENERAL = sorted(m for m in MODULES if not m.startswith("vefi.book") and m != "vefi.__main__")


def test_the_layout_is_what_the_test_expects():
    assert "vefi.relevant" in GENERAL and "vefi.book.data" in MODULES and len(GENERAL) > 20


@pytest.mark.parametrize("module", GENERAL)
def test_general_module_does_not_import_the_book(module):
    book = [m for m, _ in imports(MODULES[module]) if m.startswith("vefi.book")]
    assert not book, f"{module} imports {book}: the general library must not know the book"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_imported_from_another_module(module):
    private = [f"{m}.{n}" for m, names in imports(MODULES[module]) for n in names
               if n.startswith("_") and m != module]
    assert not private, f"{module} imports private names {private}: make them public, or keep them local"


def test_no_import_cycle_at_module_level():
    """Imports at the top of each module (not those inside functions, which run later) form no cycle."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vefi"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("vefi"))
        graph[name] = {d for d in deps if d in MODULES and d != name}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
