"""fxopt.testing: property-based testing for pass authors.

`check_pass` asserts the pass contract on one model; the hypothesis strategies (`models`,
`convnets`, `mlps`, `attention_blocks`) draw small random models with example inputs; and
`reproducer` prints a drawn model as Python source to paste into a test.

    from hypothesis import given
    import fxopt.testing as ft

    @given(ft.models())
    def test_my_pass(drawn):
        ft.check_pass("my_pass", *drawn)

The strategies need `hypothesis` (a test dependency); `check_pass` and `reproducer` do not.
"""

from __future__ import annotations

from typing import Any

from fxopt.testing.check import PassCheck, check_pass
from fxopt.testing.reproducer import build_model, reproducer, spec_of
from fxopt.testing.spec import BlockSpec, ModelSpec

__all__ = [
    "BlockSpec", "FEATURES", "ModelSpec", "PassCheck", "attention_blocks", "attention_specs",
    "build_model", "check_pass", "convnet_specs", "convnets", "mlp_specs", "mlps", "model_specs",
    "models", "reproducer", "spec_of",
]

_STRATEGIES = {
    "FEATURES", "attention_blocks", "attention_specs", "convnet_specs", "convnets", "mlp_specs",
    "mlps", "model_specs", "models",
}


def __getattr__(name: str) -> Any:
    # the strategies import hypothesis, which only test environments have
    if name in _STRATEGIES:
        from fxopt.testing import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'fxopt.testing' has no attribute {name!r}")
