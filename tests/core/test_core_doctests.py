"""The examples in the core modules' docstrings run (STYLE: a public API has a doctested example)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ("fxopt.host", "fxopt.inputs", "fxopt.output_folder", "fxopt.progress", "fxopt.cli", "fxopt.models.registry", "fxopt.compiler", "fxopt.stages")


@pytest.mark.parametrize("module", MODULES)
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
