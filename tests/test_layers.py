"""The package's layers: no module imports one that imports it back (directly or around a circle),
and every module opens with a docstring naming its concept."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "longcontrast"


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (at any depth of its code)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longcontrast."):
                found.add(node.module.split(".")[1])
        graph[path.stem] = {m for m in found if (PACKAGE / f"{m}.py").exists()}
    return graph


def test_no_import_circle():
    graph = imports()
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            assert state.get(other) != "open", f"import circle: {' -> '.join([*path, other])}"
            if other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_check_finds_a_circle():
    """Negative control: the walk above does see relative imports (readers must import nothing of
    the package but UserError; evaluation imports the readers)."""
    graph = imports()
    assert graph["readers"] <= {"__init__"} and graph["tokenization"] <= {"__init__"}
    assert "readers" in graph["records"] and "tokenization" in graph["collator"]


def test_every_module_names_its_concept():
    for path in PACKAGE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.split()) >= 5, f"{path.name} has no opening docstring"
