"""The package's layers point down: import-linter's contracts in pyproject.toml, run here.

``surgery`` is checked as installed (the working tree), then a copy of it with one import
pointing up a layer, which the same contracts must refuse: a check that cannot fail is none.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("importlinter", reason="import-linter is a dev dependency")


def lint_imports(package_parent: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the project's contracts, ``surgery`` found in ``package_parent``."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True, no_logo=True))"
    )
    argv = [sys.executable, "-c", code, str(package_parent), str(ROOT / "pyproject.toml")]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)


@pytest.mark.distributed  # spawns a process
def test_layer_contracts_are_kept():
    out = lint_imports(ROOT, ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 kept, 0 broken" in out.stdout


@pytest.mark.distributed  # spawns a process
@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("keys/select.py", "from ..loading import pipeline"),  # keys -> loading
        ("loading/units.py", "from . import handlers"),  # inside loading: units -> handlers
        ("sources/base.py", "from ..keys import select"),  # sources -> keys
    ],
)
def test_an_import_pointing_up_is_refused(tmp_path, module, upward):
    copy = tmp_path / "surgery"
    shutil.copytree(ROOT / "surgery", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text() + f"\n{upward}  # noqa: E402\n")
    out = lint_imports(tmp_path, tmp_path)
    assert out.returncode != 0, out.stdout
    assert "BROKEN" in out.stdout
