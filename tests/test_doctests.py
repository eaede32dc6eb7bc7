"""Every docstring example in fxopt runs (STYLE: a public API has a doctested example).

One collector over the whole distribution: each module of fxopt and of its subpackages mapped from
other folders (fxopt.passes, fxopt.backends, fxopt.models, fxopt.safety) whose source holds a
``>>>`` runs its examples, and must run at least one, so deleting an example or hiding it where
doctest cannot find it fails here.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import sys

import pytest

# the distribution's packages; the last four live in their own folders (pyproject's package-dir)
PACKAGES = ("fxopt", "fxopt.passes", "fxopt.backends", "fxopt.models", "fxopt.safety")
# packages a module may need that an install without the extras lacks; any other import error fails
OPTIONAL_DEPENDENCIES = frozenset({"tensorrt", "pycuda"})


def _walk() -> tuple[list[str], list[tuple[str, str]]]:
    """All module names under PACKAGES, and the (package, error) of each package that failed to import."""
    names, broken = set(PACKAGES), []

    def record(name: str) -> None:
        broken.append((name, repr(sys.exc_info()[1])))

    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names.update(info.name for info in pkgutil.walk_packages(path, f"{package}.", onerror=record))
    return sorted(names), broken


def _has_examples(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return False
    with open(spec.origin, encoding="utf-8") as f:
        return ">>>" in f.read()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
MODULES, BROKEN = _walk()
WITH_EXAMPLES = [name for name in MODULES if _has_examples(name)]


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.partition(".")[0] in OPTIONAL_DEPENDENCIES:
            pytest.skip(f"{name} needs {exc.name}, an optional dependency that is not installed")
        raise


def test_the_walk_reaches_every_subpackage_and_every_package_imports():
    assert not BROKEN, f"packages that failed to import while walking: {BROKEN}"
    for name in ("fxopt.compiler", "fxopt.passes.prune", "fxopt.passes.dependency_groups.builder",
                 "fxopt.backends.onnx", "fxopt.models.digits", "fxopt.safety.policy"):
        assert name in WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files (compiled.save("out/")) write here
    module = _import(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has '>>>' in its source but doctest found no example to run"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"
