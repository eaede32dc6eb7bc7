"""Every built-in registered pass is run through `check_pass` on drawn models.

The pass list comes from the registry, so a new pass cannot slip in untested: it is checked
with its default construction, or with an entry in `PASS_SETUPS` when it needs options or data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.passinfra.registry import registered_passes
from fxopt.testing import check_pass
from fxopt.testing.strategies import models


@dataclass(frozen=True)
class PassSetup:
    """How to exercise one pass: a factory of fresh instances, context options, models to draw.

    Attributes:
        factory: example inputs -> a fresh pass (None: ``fxopt.create_pass(name)``).
        options: example inputs -> compile-context options (e.g. calibration data).
        strategy: the models to draw (default: every family).
        atol: for lossy passes, the largest deviation accepted (None: only reported).
        max_examples: at most this many drawn models, whatever the profile (a pass that trains on each).
    """

    factory: Callable[[tuple[Any, ...]], Any] | None = None
    options: Callable[[tuple[Any, ...]], dict[str, Any]] = field(default=lambda inputs: {})
    strategy: Callable[[], st.SearchStrategy[Any]] = models
    atol: float | None = None
    max_examples: int | None = None


# Passes that need options or data; every other built-in pass is built with no arguments.
PASS_SETUPS: dict[str, PassSetup] = {
    "prune": PassSetup(factory=lambda inputs: fxopt.create_pass("prune", amount=0.3)),
    "quantize": PassSetup(options=lambda inputs: {"calib_data": [inputs]}),
    # a budget every drawn model meets (its contract, not the search, is under test), estimated (no ORT timing)
    "slim": PassSetup(factory=lambda inputs: fxopt.passes.Slim(latency_ms=1e6, trials=2, seed=0, measure="estimate"),
                      options=lambda inputs: {"calib_data": [inputs]}),
    # two steps distilling the drawn model's own outputs (no labels), on batches of two or more (BatchNorm trains
    # on them); QAT on a float graph has nothing to train
    "finetune": PassSetup(factory=lambda inputs: fxopt.passes.Finetune(steps=2, data=[(inputs, None)], lr=1e-4, distill=_output_match()),
                          strategy=lambda: models().filter(_batched), max_examples=60),
    "qat": PassSetup(factory=lambda inputs: fxopt.passes.QuantAwareTraining(steps=2, data=[(inputs, None)], lr=1e-4,
                                                                          distill=_output_match()), max_examples=60),
}


def _at_most(count: int | None) -> Callable[[Any], Any]:
    """The loaded profile's settings with at most `count` examples (None: as they are)."""
    if count is None:
        return lambda test: test
    return settings(max_examples=min(count, settings.default.max_examples))


def _batched(drawn: tuple[Any, tuple[Any, ...]]) -> bool:
    return all(x.shape[0] >= 2 for x in drawn[1] if isinstance(x, torch.Tensor) and x.dim() > 0)


def _output_match() -> Any:
    from fxopt.distill import Distill
    from fxopt.passes.slim import OutputMatch

    return Distill(logits=OutputMatch())


def builtin_pass_names() -> list[str]:
    """Registered passes that ship with fxopt (user passes registered by other tests excluded)."""
    return sorted(name for name, cls in registered_passes().items() if cls.__module__.startswith("fxopt.passes."))


def make_pass(name: str, inputs: tuple[Any, ...] = (torch.randn(1, 3),)) -> Any:
    setup = PASS_SETUPS.get(name)
    return setup.factory(inputs) if setup is not None and setup.factory is not None else fxopt.create_pass(name)


def test_every_builtin_pass_is_registered_by_name():
    names = builtin_pass_names()
    assert {"canonicalize", "eliminate_dead_code", "fold_batchnorm"} <= set(names)
    assert set(names) <= set(fxopt.pass_names())


@pytest.mark.parametrize("name", builtin_pass_names())
def test_pass_constructs_by_default_or_has_a_setup(name):
    try:
        the_pass = make_pass(name)
    except Exception as exc:  # noqa: BLE001 - the point is to name the pass and what to do
        pytest.fail(
            f"registered pass '{name}' cannot be built with no options ({type(exc).__name__}: {exc}); "
            f"add an entry for it to PASS_SETUPS in {__file__}"
        )
    assert the_pass.name == name


@pytest.mark.parametrize("name", builtin_pass_names())
def test_pass_keeps_its_contract_on_drawn_models(name):
    setup = PASS_SETUPS.get(name, PassSetup())

    @given(setup.strategy())
    @_at_most(setup.max_examples)
    def contract(drawn):
        model, inputs = drawn
        result = check_pass(lambda: make_pass(name, inputs), model, inputs, atol=setup.atol, **setup.options(inputs))
        event(f"{name}: {result.record.status}")

    contract()
