"""The docstring examples of fxopt.testing run."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["check", "coverage", "reproducer", "strategies"])
def test_doctests(module):
    result = doctest.testmod(importlib.import_module(f"fxopt.testing.{module}"))
    assert result.attempted > 0 and result.failed == 0
