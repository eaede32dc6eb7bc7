"""Extension points: what the core asks of the packages above it (the ONNX lowering, a target's
deployment plan, the safety policy, model specs, int8 and distillation helpers) without importing them.

The one-way rule (DESIGN.md): `fxopt.passes`, `fxopt.backends`, `fxopt.safety` and `fxopt.models`
import the core and register here when they are imported; the core names an extension point and the
package that provides it, and the package is loaded by name the first time the point is asked for, as
the pass registry loads `fxopt.passes`. `tests/core/test_import_rule.py` holds the core to it. A user
may register an extension of their own (another target's deployment, say) the same way.

Example:
    >>> register_extension("deployment", "my_runtime", lambda *a, **k: None)  # doctest: +ELLIPSIS
    <function <lambda> at ...>
    >>> extension("deployment", "my_runtime") is not None
    True
    >>> extension("deployment", "nothing_here", default=None) is None
    True
"""

from __future__ import annotations

import importlib
from typing import Any

from fxopt.errors import FxoptError

__all__ = ["EXTENSION_POINTS", "ExtensionError", "extension", "register_extension"]

# extension point -> the built-in package that registers its entries when imported
EXTENSION_POINTS: dict[str, str] = {
    "lower": "fxopt.backends",  # "onnx": (graph, inputs, target, ...) -> OnnxExport, verified
    "deployment": "fxopt.backends",  # a target backend ("tensorrt") -> its build plan, checks and placement
    "safety_policy": "fxopt.safety",  # "strict": the policy a safety model compiles under
    "model_spec": "fxopt.models",  # "of_model": a model -> its registered spec (or None)
    "float_twin": "fxopt.passes",  # "int8": a fake-quantised graph -> the same graph in float (or None)
    "kept_channels": "fxopt.passes",  # "prune": a prune pass -> the channels it kept (for feature distillation)
    "feature_hooks": "fxopt.passes",  # "distill": (match_features, hooked_copy)
}

_ENTRIES: dict[tuple[str, str], Any] = {}
_LOADED: set[str] = set()
_MISSING = object()


class ExtensionError(FxoptError):
    """An extension point or entry that nothing registered."""


def register_extension(point: str, name: str, value: Any) -> Any:
    """Register `value` as `name` at extension point `point` (replacing an earlier entry); returns it."""
    if point not in EXTENSION_POINTS:
        raise ExtensionError(f"unknown extension point {point!r}; known: {', '.join(sorted(EXTENSION_POINTS))}")
    _ENTRIES[(point, name)] = value
    return value


def extension(point: str, name: str, default: Any = _MISSING) -> Any:
    """The entry registered as `name` at `point`, loading the built-in package that provides the
    point first; `default` (when given) where there is none.

    Raises:
        ExtensionError: an unknown point, or no entry and no default.
    """
    if point not in EXTENSION_POINTS:
        raise ExtensionError(f"unknown extension point {point!r}; known: {', '.join(sorted(EXTENSION_POINTS))}")
    package = EXTENSION_POINTS[point]
    if package not in _LOADED:
        importlib.import_module(package)  # registers its entries (another thread importing it meanwhile waits on Python's import lock)
        _LOADED.add(package)  # only once they are all registered
    if (point, name) in _ENTRIES:
        return _ENTRIES[(point, name)]
    if default is not _MISSING:
        return default
    known = sorted(n for p, n in _ENTRIES if p == point)
    raise ExtensionError(f"nothing is registered as {name!r} at extension point {point!r}; registered: {', '.join(known) or 'none'}")
