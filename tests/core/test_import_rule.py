"""The one-way rule (DESIGN.md): the core never imports fxopt.passes, fxopt.backends, fxopt.safety or
fxopt.models, at top level or inside a function; they register with it (`fxopt.extensions`)."""

from __future__ import annotations

import ast
from pathlib import Path

import fxopt

ABOVE = ("fxopt.passes", "fxopt.backends", "fxopt.safety", "fxopt.models")
CORE = Path(fxopt.__file__).parent
# applications on top of the public API, like fxopt.automation: the CLI, the demo
ON_TOP = {"cli.py", "demo.py", "__main__.py"}
# the two places that load the built-in packages by name, as entry points would
LOADERS = {"registry.py", "extensions.py"}


def imports_above(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith(ABOVE)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n.startswith(ABOVE)][:1]
    return found


def core_modules() -> list[Path]:
    return [p for p in sorted(CORE.rglob("*.py")) if "automation" not in p.relative_to(CORE).parts and p.name not in ON_TOP]


def test_no_core_module_imports_the_packages_above_it():
    broken = [f"{p.relative_to(CORE)}:{line}: {name}" for p in core_modules() for line, name in imports_above(ast.parse(p.read_text()))]
    assert not broken, "the core imports a package above it (register an extension instead):\n" + "\n".join(broken)


def test_only_the_loaders_name_the_packages_above_by_string():
    named = []
    for p in core_modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                named += [f"{p.relative_to(CORE)}:{node.lineno}" for a in node.args
                          if isinstance(a, ast.Constant) and str(a.value).startswith(ABOVE) and p.name not in LOADERS]
    assert not named, named


def test_the_rule_catches_an_import_inside_a_function():
    source = "def f():\n    from fxopt.passes.quantize import float_graph\n    import fxopt.backends.onnx\n"
    assert [n for _, n in imports_above(ast.parse(source))] == ["fxopt.passes.quantize", "fxopt.backends.onnx"]


def test_every_extension_point_is_provided_by_its_package():
    from fxopt.extensions import EXTENSION_POINTS, extension

    expected = {"lower": "onnx", "deployment": "tensorrt", "safety_policy": "strict", "model_spec": "of_model",
                "float_twin": "int8", "kept_channels": "prune", "feature_hooks": "distill"}
    assert set(expected) == set(EXTENSION_POINTS)
    for point, name in expected.items():
        assert extension(point, name) is not None, point
