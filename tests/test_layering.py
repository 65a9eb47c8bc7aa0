"""Dependencies point one way: transport → sketch/sites → fit/correct → methods → bench → cli.

The core (what `import torch_dmc` loads) never imports the benchmark, the command line, the
methods, the data sets or the shipped models.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "torch_dmc"
CORE = ["_version", "native", "transport", "sketch", "sites", "stats_io", "options", "fit", "correct",
        "shift", "_sync", "__init__"]
OUTSIDE_CORE = {"bench", "cli", "methods", "data", "models", "__main__"}


def _imported_package_modules(path: Path) -> set[str]:
    """First component of every module of this package that ``path`` imports (relative or absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("torch_dmc."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("torch_dmc."))
    return found


@pytest.mark.parametrize("module", CORE)
def test_core_modules_import_nothing_outside_the_core(module):
    imported = _imported_package_modules(PACKAGE / f"{module}.py")
    assert not imported & OUTSIDE_CORE, f"{module}.py imports {sorted(imported & OUTSIDE_CORE)}"


def test_core_never_imports_the_package_init():
    for module in CORE[:-1]:
        source = (PACKAGE / f"{module}.py").read_text()
        assert "from . import" not in source, f"{module}.py imports the package __init__"


def test_importing_the_package_loads_no_benchmark_or_cli():
    code = ("import sys, torch_dmc; bad = [m for m in sys.modules if m.split('.')[:2] in "
            "(['torch_dmc', 'bench'], ['torch_dmc', 'cli'])]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)
