"""The pass registry: names the CLI, pipelines and targets look passes up by."""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from fxopt.errors import PassRegistryError
from fxopt.passinfra.pass_base import FxoptPass

_PASSES: dict[str, type[FxoptPass]] = {}
P = TypeVar("P", bound=type[FxoptPass])


def register_pass(cls: P) -> P:
    """Class decorator that registers an `FxoptPass` subclass under its ``name``.

    Example:
        >>> from fxopt.passinfra.pass_base import FxoptPass, PassResult
        >>> @register_pass
        ... class MyNoOp(FxoptPass):
        ...     name = "doc_example_noop"
        ...     def call(self, gm):
        ...         return PassResult(gm, False)
        >>> "doc_example_noop" in pass_names()
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, FxoptPass)):
        raise PassRegistryError(f"register_pass expects an FxoptPass subclass, got {cls!r}")
    if not cls.name:
        raise PassRegistryError(f"{cls.__qualname__} has no `name`; set a class attribute name = '...'")
    _load_builtins()  # a user pass must meet the built-in names before it can take one
    existing = _PASSES.get(cls.name)
    if existing is not None and _qualified(existing) != _qualified(cls):
        raise PassRegistryError(
            f"pass name '{cls.name}' of {_qualified(cls)} is already taken by {_qualified(existing)}; "
            "choose another name"
        )
    _PASSES[cls.name] = cls  # the same class again (a re-imported module) replaces itself
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_builtins() -> None:
    # Importing fxopt.passes registers the built-in passes; the core names none of them. Done before any lookup or
    # registration, so no user pass can shadow a built-in. Python's import lock makes another thread wait until the
    # package has finished importing (every built-in registered); the importing thread re-enters here from each
    # registration and goes on (the package is in sys.modules, partly imported). A lock of our own here could
    # deadlock against that import lock.
    importlib.import_module("fxopt.passes")


def pass_class(name: str) -> type[FxoptPass]:
    """The registered class for `name`; raises `PassRegistryError` listing the known names."""
    _load_builtins()
    try:
        return _PASSES[name]
    except KeyError:
        raise PassRegistryError(
            f"unknown pass '{name}'; registered passes: {', '.join(sorted(_PASSES))}"
        ) from None


def create_pass(name: str, **options: Any) -> FxoptPass:
    """A fresh instance of the pass registered as `name`, built with `options`."""
    cls = pass_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise PassRegistryError(f"bad options for pass '{name}': {exc}") from exc


def pass_names() -> list[str]:
    """Names of all registered passes, sorted."""
    _load_builtins()
    return sorted(_PASSES)


def registered_passes() -> dict[str, type[FxoptPass]]:
    """A copy of the registry (name -> class)."""
    _load_builtins()
    return dict(_PASSES)
