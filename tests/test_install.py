"""What `pip install medqa-parity` pulls: the library and its command, no test runner and no tracking server."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_core_install_pulls_no_test_runner_or_mlflow():
    core = _names(PYPROJECT["project"]["dependencies"])
    assert not core & {"pytest", "pytest-benchmark", "mlflow", "mlflow-skinny"}, core
    extras = {k: _names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    assert {"pytest", "pytest-benchmark"} <= extras["bench"] and "pytest-benchmark" in extras["test"]
    assert "mlflow" in extras["mlflow"]


def test_no_module_of_the_package_imports_them_when_loaded():
    """Importing medqa_core needs none of the extras: mlflow is imported inside the export function only."""
    for path in (ROOT / "medqa_core").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [n for n in names if n.split(".")[0] in ("pytest", "pytest_benchmark", "mlflow")], path
