"""The package is laid out by stage of the data flow, and its modules import down the flow: no stage reaches back
into one after it, no module into the package's root, and no import circle closes."""

from __future__ import annotations

import ast
from pathlib import Path

import ckpt_trace

PACKAGE = Path(ckpt_trace.__file__).parent

STAGES = ["errors", "paths", "store", "fetch", "calibration", "microsuite", "model", "scoring", "scan", "pruning",
          "evaluation", "analysis", "cli"]
"""In data-flow order: a module may import its own stage and those before it. `testing` imports none."""
EDGES = {"errors", "paths", "store", "cli"}
MOST_LINES = 450


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module and subpackage, by its name inside the package ("scan.run", "scan", "store")."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names[".".join(parts)] = path
    return names


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules a file imports, at the top or inside a function; "" for the package's root."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[: len(here) - node.level + 1] if node.level > 1 else here
            target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ckpt_trace"):
            target = node.module.removeprefix("ckpt_trace").lstrip(".")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("ckpt_trace.") for a in node.names if a.name.startswith("ckpt_trace."))
            continue
        else:
            continue
        for alias in node.names:  # `from . import store` imports a module; `from . import VERSION` the root
            child = f"{target}.{alias.name}".strip(".")
            found.add(child if child in known else target)
    return found


def test_modules_import_down_the_data_flow():
    names = module_names()
    known = set(names)
    graph = {name: imports(path, name, known) - {name} for name, path in names.items()}
    assert graph["store"] and graph["scan.run"]  # the reader sees the imports
    back_to_root = sorted(name for name, found in graph.items() if "" in found)
    assert back_to_root == []
    upward = []
    for name, found in graph.items():
        stage = name.split(".")[0]
        if stage == "testing":
            upward += [f"{name} -> {t}" for t in found if t.split(".")[0] != "testing"]
            continue
        assert stage in STAGES, f"{name} belongs to no stage"
        upward += [f"{name} -> {t}" for t in found if STAGES.index(t.split(".")[0]) > STAGES.index(stage)]
    assert upward == []


def test_no_import_cycles():
    names = module_names()
    # A package's __init__ re-exports its modules; the circles that matter are between modules.
    graph = {n: {t for t in imports(p, n, set(names)) if t in names} - {n} for n, p in names.items()
             if p.name != "__init__.py"}
    graph = {n: {t for t in found if t in graph} for n, found in graph.items()}
    cycles = []

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest name
                visit([*path, nxt])

    for module in sorted(graph):
        visit([module])
    assert cycles == []


def test_every_stage_is_a_subpackage_that_says_what_it_takes_and_may_import():
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages == sorted({*STAGES, "testing"} - EDGES)
    for name in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8")))
        assert doc and "Takes" in doc and "May import" in doc, name
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted({*EDGES, "__init__"})


def test_no_module_outgrows_one_read():
    long = {name: n for name, path in module_names().items() if (n := len(path.read_text().splitlines())) > MOST_LINES}
    assert long == {}


def test_the_reader_sees_function_level_and_nested_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "d").mkdir(parents=True)
    for name in ("a.py", "b.py", "c.py", "d/__init__.py", "d/e.py"):
        (package / name).write_text("")
    file = package / "d" / "m.py"
    file.write_text("from ..a import x\nimport ckpt_trace.b\ndef f():\n    from .. import c\n    from .e import y\n"
                    "    from . import e\n    from .. import VERSION\n")
    known = set(module_names(package))
    assert imports(file, "d.m", known) == {"a", "b", "c", "d.e", ""}
