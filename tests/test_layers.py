"""Layers point down only: cli -> runners -> runtime -> methods -> codecs; report/ only reads results."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedsqueeze"

# a module may import only modules of a lower rank (or its own package)
RANK = {
    "errors": 0,
    "options": 1,
    "plugins": 1,
    "seeding": 1,
    "config": 2,
    "codecs": 2,
    "treeio": 3,
    "data": 3,
    "models": 3,
    "training": 3,
    "privacy": 3,
    "results": 3,
    "flower_compression": 3,
    "store": 4,
    "masking": 4,
    "attacks": 4,
    "task": 5,
    "methods": 6,
    "runtime": 7,
    "report": 7,
    "runners": 8,
    "bench": 8.5,  # fills a suite through the runners; only the CLI is above it
    "cli": 9,
    "api": 9,
    "__main__": 10,
    "__init__": 10,
}


def _top(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The fedsqueeze top-level modules ``path`` imports, anywhere in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedsqueeze."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "fedsqueeze":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fedsqueeze."))
    return found


def test_every_module_has_a_layer():
    tops = {_top(p) for p in PACKAGE.rglob("*.py")}
    assert tops <= set(RANK), f"give these modules a layer in RANK: {sorted(tops - set(RANK))}"


def test_imports_point_down_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _top(path)
        for other in _imports(path):
            if other != me and RANK[other] >= RANK[me]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not upward, upward


def test_report_never_runs_anything():
    for path in (PACKAGE / "report").rglob("*.py"):
        assert not _imports(path) & {"runtime", "runners", "methods", "task"}, path
