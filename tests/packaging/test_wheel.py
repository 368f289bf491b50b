"""The package as users get it: a wheel and an sdist that build, pass ``twine check`` and work
from a fresh virtualenv, away from the source tree.

The fresh virtualenv gets the wheel alone (``--no-deps --no-index``); its dependencies (torch,
...) are made visible from the test's own environment through a path file, which adds that
``site-packages`` as a plain folder: path files inside it (such as the editable install's
finder for the source tree) are not processed, so ``import surgery`` can only find the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import surgery

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # builds and runs a fresh venv


def _run(args: list[str], cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], ROOT)
    return out


def test_wheel_and_sdist_are_named_torch_surgery_and_pass_twine_check(dist):
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    assert [w.name for w in wheels] == [f"torch_surgery-{surgery.__version__}-py3-none-any.whl"]
    assert [s.name for s in sdists] == [f"torch_surgery-{surgery.__version__}.tar.gz"]
    _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels + sdists)], dist)
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "surgery/__init__.py" in names and "surgery/py.typed" in names
    assert not any(n.startswith(("tests/", "recipes/")) for n in names)
    meta = zipfile.ZipFile(wheels[0]).read(
        f"torch_surgery-{surgery.__version__}.dist-info/METADATA"
    )
    assert b"Name: torch-surgery" in meta and b"Requires-Dist: torch>=" in meta
    entry_points = zipfile.ZipFile(wheels[0]).read(
        f"torch_surgery-{surgery.__version__}.dist-info/entry_points.txt"
    )
    assert b"surgery = surgery.cli:main" in entry_points
    with tarfile.open(sdists[0]) as tf:
        members = tf.getnames()
    top = f"torch_surgery-{surgery.__version__}"
    assert f"{top}/pyproject.toml" in members and f"{top}/surgery/__init__.py" in members


def test_wheel_works_from_a_fresh_virtualenv(dist, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path)
    # Every site-packages folder this interpreter sees (a virtualenv may reach another one
    # through a path file itself), never the source tree.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    assert sysconfig.get_path("purelib") in deps
    (Path(site.strip()) / "_deps.pth").write_text("\n".join(deps) + "\n")
    wheel = next(dist.glob("*.whl"))
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path)
    where = _run([str(py), "-c", "import surgery; print(surgery.__file__)"], tmp_path)
    assert where.strip().startswith(str(venv)), where
    assert not where.strip().startswith(str(ROOT))
    version = _run([str(venv / "bin" / "surgery"), "--version"], tmp_path)
    assert version.startswith(f"surgery {surgery.__version__}") and str(venv) in version
    helped = _run([str(py), "-m", "surgery", "--help"], tmp_path)
    assert "inspect" in helped and "diff" in helped
