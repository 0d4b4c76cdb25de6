"""The dependency rule of docs/architecture.md, read off the imports of every module (function-level ones too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports() -> dict[str, set[str]]:
    """Module file (relative to the root) -> every module name it imports."""
    found: dict[str, set[str]] = {}
    for folder in ("medqa_core", "bench", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            names: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module)
                elif isinstance(node, ast.Import):
                    names.update(a.name for a in node.names)
            found[path.relative_to(ROOT).as_posix()] = names
    return found


def importers(module: str) -> list[str]:
    return sorted(f for f, names in imports().items() if any(n == module or n.startswith(module + ".")
                                                             for n in names))


def test_nothing_imports_the_orchestrator_but_the_cli():
    assert importers("medqa_core.run") == ["medqa_core/cli.py"]
    assert importers("medqa_core.cli") == []


def test_measure_and_results_import_nothing_above_them():
    above = ("medqa_core.engine", "medqa_core.run", "medqa_core.arms", "medqa_core.compare", "medqa_core.report",
             "medqa_core.gate", "medqa_core.cli")
    for f, names in imports().items():
        if f.startswith(("medqa_core/measure/", "medqa_core/results/")):
            assert not [n for n in names if n.startswith(above)], f


def test_compare_report_and_gate_are_pure_functions_of_results():
    forbidden = ("torch", "medqa_core.engine", "medqa_core.run", "medqa_core.arms", "medqa_core.measure")
    for f, names in imports().items():
        if f.startswith(("medqa_core/compare/", "medqa_core/report/", "medqa_core/gate/")):
            assert not [n for n in names if n == "torch" or n.startswith(forbidden)], f
