"""The package's modules import down the data flow: no module reaches back into one that imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import ckpt_trace

PACKAGE = Path(ckpt_trace.__file__).parent


def imports(path: Path) -> set[str]:
    """The package modules a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckpt_trace."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ckpt_trace."))
    return found


def test_no_import_cycles():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    graph = {m: imports(PACKAGE / f"{m}.py") & modules - {m} for m in modules}
    cycles = []

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest name
                visit([*path, nxt])

    for module in sorted(modules):
        visit([module])
    assert graph["store"] and graph["models"]  # the reader sees relative imports
    assert cycles == []


def test_the_reader_sees_function_level_imports(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("from .a import x\nimport ckpt_trace.b\ndef f():\n    from . import c\n    from .d.e import y\n")
    assert imports(file) == {"a", "b", "c", "d"}
