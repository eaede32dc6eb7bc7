"""An installed wheel (not only the editable install) carries fxopt and its four mapped subpackages."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("fxopt-*.whl"))


def test_wheel_holds_only_fxopt(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("fxopt-")}
    assert top == {"fxopt"}
    for sub in ("passes", "backends", "models", "safety", "testing"):
        assert f"fxopt/{sub}/__init__.py" in names, sub


def test_unpacked_wheel_imports_all_subpackages(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import fxopt, fxopt.passes, fxopt.backends.onnx, fxopt.models, fxopt.safety;"
        "print(fxopt.__file__); print(fxopt.passes.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = proc.stdout.split()
    assert all(f.startswith(str(tmp_path)) for f in files), files


def test_subpackages_are_attributes_of_a_plain_import_fxopt():
    import subprocess
    import sys

    code = "import sys, fxopt; assert 'fxopt.models' not in sys.modules; print(fxopt.models.names()[0], fxopt.passes.PruneChannels.name)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["camera_multitask", "prune"]
