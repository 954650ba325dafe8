"""Imports run one way (the contracts in .importlinter), checked with import-linter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
pytestmark = pytest.mark.skipif(not LINT_IMPORTS.is_file(),
                                reason="import-linter is in the test extra (make setup)")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` (first on the path: not the install)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def copy_of_project(tmp_path: Path) -> Path:
    for name in ("pipelines", "service"):
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_project_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(("module", "upward", "contract"), [
    # compute (tensor maths) reaching up to a job
    ("pipelines/compute/stats.py", "from pipelines.jobs import local", "Imports run one way"),
    # data access reaching up to presentation: the reader ↔ views cycle this layout removed
    ("pipelines/dataset/reader.py", "import pipelines.views", "Imports run one way"),
    # a view loading a model
    ("pipelines/views/html.py", "from pipelines.backends import base", "Views read datasets"),
])
def test_an_upward_import_breaks_a_contract(tmp_path: Path, module: str, upward: str,
                                            contract: str) -> None:
    copy = copy_of_project(tmp_path)
    target = copy / module
    target.write_text(target.read_text() + f"\n{upward}  # deliberately upward\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken and module.removesuffix(".py").replace("/", ".") in broken
